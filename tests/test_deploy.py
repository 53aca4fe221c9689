"""The deployment examples stay valid as the config schema evolves."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical_name

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


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pairs = [line.split("==", 1) for line in lines if line and not line.startswith("#")]
    return {canonical_name(name): version for name, version in pairs}


def test_every_dependency_and_test_extra_is_pinned_within_its_range() -> None:
    """A fresh install gets exactly the tested set: nothing pyproject.toml names is left to
    whatever the registry serves that day (joserfc 1.8.0 once broke a fresh machine)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for spec in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(spec)
        name = canonical_name(requirement.name)
        assert name in pins, f"{name} is not pinned in constraints.txt (bash .ci/lock)"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {spec}"


def test_every_install_path_uses_the_pinned_set() -> None:
    readme = (ROOT / "README.md").read_text()
    first_command = readme.split("```sh\n", 1)[1].split("\n", 1)[0]
    assert "pip install -c constraints.txt -e . && gateway demo" in first_command
    assert "-c constraints.txt" in (ROOT / ".ci/run").read_text()
    assert "-c constraints.txt" in (ROOT / "deploy/Dockerfile").read_text()
