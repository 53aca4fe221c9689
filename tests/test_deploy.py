"""The deployment examples stay valid as the config schema evolves."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical_name
from yarl import URL

from gateway import __version__
from gateway import config as config_module

ROOT = Path(__file__).resolve().parents[1]


def k8s_docs() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "deploy/kubernetes/gateway-sidecar.yaml").read_text()))


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_kubernetes_example_config_is_a_valid_gateway_config() -> None:
    docs = k8s_docs()
    config_map = named(docs, "ConfigMap", "gateway-config")
    secret = named(docs, "Secret", "gateway-secrets")
    config = config_module.parse(yaml.safe_load(config_map["data"]["config.yaml"]),
                                 dict(secret["stringData"]))
    assert config.session.store.startswith("redis://")
    assert config.cookie_secure is True
    assert config.server.shutdown_delay > 0
    app = named(docs, "Deployment", "legacy-app")["spec"]["template"]["spec"]
    pre_stop = app["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pre_stop + config.server.shutdown_delay + config.server.shutdown_timeout
    assert app["terminationGracePeriodSeconds"] > grace


def test_kubernetes_example_runs_the_gateway_as_a_native_sidecar_exposing_only_it() -> None:
    docs = k8s_docs()
    pod = named(docs, "Deployment", "legacy-app")["spec"]["template"]["spec"]
    [gateway] = pod["initContainers"]
    assert gateway["name"] == "gateway" and gateway["restartPolicy"] == "Always"
    assert gateway["securityContext"]["runAsNonRoot"] is True
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/oauth2/readyz"
    assert [c["name"] for c in pod["containers"]] == ["app"]
    assert pod["containers"][0]["ports"] == []
    service = named(docs, "Service", "legacy-app")
    # a number: Services resolve native sidecars' named ports only from Kubernetes 1.32
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [
        gateway["ports"][0]["containerPort"]]
    [app] = pod["containers"]
    assert app["lifecycle"]["preStop"]["sleep"]["seconds"] >= 5  # endpoints go first


def test_kubernetes_example_pins_images_and_keeps_secrets_off_command_lines() -> None:
    docs = k8s_docs()
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            name, _, tag = container["image"].rpartition(":")
            assert name and tag and tag != "latest", container["image"]
            words = " ".join([*container.get("args", []), *container.get("command", [])])
            assert "pass" not in words.lower() and "$(" not in words, words
    assert named(docs, "Deployment", "legacy-app")["spec"]["template"]["spec"][
        "initContainers"][0]["image"] == f"gateway:{__version__}"


def test_kubernetes_example_lets_only_the_gateways_reach_redis() -> None:
    policy = named(k8s_docs(), "NetworkPolicy", "redis-from-gateways-only")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app": "redis"}
    [rule] = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app": "legacy-app"}}}]


def test_compose_runs_its_own_config_listening_beyond_loopback_on_its_redis() -> None:
    """It used to mount config.example.yaml, which listens on 127.0.0.1 with memory://."""
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    gateway = compose["services"]["gateway"]
    [mount] = gateway["volumes"]
    source, target, _ = mount.split(":")
    assert target == "/etc/gateway/config.yaml"
    env = {name: "x" * 32 if "SECRET" in name else "https://idp.example.com"
           for name in gateway["environment"]}
    config = config_module.load(ROOT / "deploy" / source, env)
    assert config.server.host == "0.0.0.0"  # noqa: S104  (inside the container)
    assert URL(config.session.store).host in compose["services"]  # its own Redis service
    assert config.routes[0].upstream.removeprefix("http://").split(":")[0] in compose["services"]
    for service in compose["services"].values():
        assert service["image"].rpartition(":")[2] not in ("", "latest"), service["image"]
    assert gateway["ports"] == ["127.0.0.1:4180:4180"]


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


FORWARD_AUTH = ROOT / "deploy" / "forward-auth"


def test_forward_auth_gateway_config_is_valid_and_trusts_only_the_front() -> None:
    config = config_module.parse(yaml.safe_load((FORWARD_AUTH / "gateway.yaml").read_text()),
                                 {"GW_CLIENT_SECRET": "s" * 32, "GW_STORE_URL": "redis://r:6379"})
    assert config.server.trusted_proxies == ("127.0.0.1/32",)
    assert [route.name for route in config.routes] == ["admin", "app"]


def test_traefik_forward_auth_never_takes_a_clients_description() -> None:
    """Static checks only: CI has no Traefik binary (the nginx config runs end to end)."""
    http = yaml.safe_load((FORWARD_AUTH / "traefik.yaml").read_text())["http"]
    forward = http["middlewares"]["gateway-auth"]["forwardAuth"]
    assert URL(forward["address"]).path == "/oauth2/auth"
    assert forward["trustForwardHeader"] is False
    assert set(forward["authResponseHeaders"]) >= {"X-Auth-Request-User",
                                                   "X-Auth-Request-Groups"}
    assert "!Path(`/oauth2/auth`)" in http["routers"]["gateway"]["rule"]
    assert http["routers"]["app"]["middlewares"] == ["strip-identity", "gateway-auth"]


def test_envoy_ext_authz_fails_closed_and_hides_the_check_endpoint() -> None:
    """Static checks only: CI has no Envoy binary (the nginx config runs end to end)."""
    listener = yaml.safe_load((FORWARD_AUTH / "envoy.yaml").read_text())[
        "static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_authz = manager["http_filters"][0]["typed_config"]
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["http_service"]["path_prefix"] == "/oauth2/auth"
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    hidden = [r["match"] for r in routes if r.get("direct_response", {}).get("status") == 404]
    assert hidden == [{"path": "/oauth2/auth"}, {"prefix": "/oauth2/auth/"}]
    unchecked = [r["match"] for r in routes
                 if r.get("typed_per_filter_config", {}).get(
                     "envoy.filters.http.ext_authz", {}).get("disabled")]
    assert {"prefix": "/"} not in unchecked
