"""The deployment examples stay valid as the config schema evolves."""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway import config as config_module

ROOT = Path(__file__).resolve().parents[1]


def test_kubernetes_example_config_is_a_valid_gateway_config() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/gateway-sidecar.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    secret = next(d for d in docs if d["kind"] == "Secret")
    config = config_module.parse(yaml.safe_load(config_map["data"]["config.yaml"]),
                                 dict(secret["stringData"]))
    assert config.session.store.startswith("redis://")
    assert config.cookie_secure is True


def test_kubernetes_example_exposes_only_the_gateway_port() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/gateway-sidecar.yaml").read_text()))
    app = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] != "redis")
    containers = {c["name"]: c for c in app["spec"]["template"]["spec"]["containers"]}
    assert containers["app"]["ports"] == []
    assert containers["gateway"]["securityContext"]["runAsNonRoot"] is True
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] != "redis")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_dockerfile_runs_gateway_as_non_root() -> None:
    text = (ROOT / "deploy/Dockerfile").read_text()
    assert "USER 10001" in text
    assert 'ENTRYPOINT ["gateway"]' in text
