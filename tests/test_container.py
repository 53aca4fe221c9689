"""The container image, as deploy/build-image.sh builds it and as production runs it.

Built once for this module (the engine's layer cache and the script's wheel cache make a
rebuild after a change to gateway/ take seconds), then run with podman: read-only root
filesystem (no tmpfs either: the gateway writes nothing), host networking, the config mounted
at the image's $GATEWAY_CONFIG, the client secret from the environment, sessions in a
redis-server of the test's. A real Chromium signs in through it at the demo IdP; the
container is then replaced by a new one, which still knows the session (it lives in Redis),
and each stops cleanly on SIGTERM.

Skipped, with the reason, only where podman or mmdebstrap is not installed (.ci/run installs
both); a build or run that fails here fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from conftest import (
    CLIENT_SECRET,
    chromium_sign_in,
    free_port,
    idp_and_upstream,
    raw_config,
    wait_until_ready,
)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/gateway:test"
BUILD_TIMEOUT = 900


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("GATEWAY_IMAGE_CACHE") or Path(base) / "gateway-image")


@pytest.fixture(scope="module")
def build_env() -> dict[str, str]:
    """The environment for deploy/build-image.sh, its cache dir named: the containers.conf it
    writes there (unless CONTAINERS_CONF is set) is the one the containers run with."""
    for binary, package in (("podman", "podman"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(binary) is None:
            pytest.skip(
                f"{binary} is not installed (.ci/run installs {package}, runc and mmdebstrap)"
            )
    return {**os.environ, "GATEWAY_IMAGE_CACHE": str(_cache_dir())}


@pytest.fixture(scope="module")
def podman_env(build_env: dict[str, str], image: str) -> dict[str, str]:
    """The environment for podman, once the image is built."""
    conf = build_env.get("CONTAINERS_CONF") or str(_cache_dir() / "containers.conf")
    return {**build_env, "CONTAINERS_CONF": conf}


@pytest.fixture(scope="module")
def image(build_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    log = tmp_path_factory.mktemp("image") / "build.log"
    started = time.monotonic()
    with log.open("wb") as out:
        result = subprocess.run(
            [str(ROOT / "deploy/build-image.sh"), TAG],
            env=build_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    text = log.read_text(errors="replace")
    assert result.returncode == 0, f"deploy/build-image.sh failed:\n{text[-6000:]}"
    print(f"image built in {time.monotonic() - started:.0f} s")  # shown with -s or -rP
    return TAG


async def _podman(env: Mapping[str, str], *args: str, check: bool = True) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "podman",
        *args,
        env=dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    text = out.decode(errors="replace")
    assert proc.returncode is not None
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}: {text}"
    return proc.returncode, text


@contextlib.asynccontextmanager
async def container(
    env: Mapping[str, str], image: str, config: Path, public_url: str, name: str
) -> AsyncIterator[str]:
    """The image run as production would, until SIGTERM; asserts it then exited 0."""
    run_env = {**env, "SECRET": CLIENT_SECRET}  # --env SECRET: the value never on argv
    await _podman(env, "rm", "--force", "--ignore", name)
    await _podman(
        run_env,
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop",
        "all",
        "--security-opt",
        "no-new-privileges",
        "--health-interval",
        "disable",
        "--volume",
        f"{config}:/etc/gateway/config.yaml:ro",
        "--env",
        "SECRET",
        "--env",
        f"GATEWAY_HEALTHCHECK_URL={public_url}/oauth2/healthz",
        "--stop-timeout",
        "20",
        image,
    )
    try:
        try:
            await wait_until_ready(public_url + "/oauth2/readyz", attempts=300)
        except AssertionError:
            _, logs = await _podman(env, "logs", name, check=False)
            raise AssertionError(f"the container never got ready:\n{logs[-4000:]}") from None
        yield name
        await _podman(env, "stop", "--time", "20", name)
        _, code = await _podman(env, "inspect", "--format", "{{.State.ExitCode}}", name)
        _, logs = await _podman(env, "logs", name, check=False)
        assert code.strip() == "0", f"exited {code.strip()} on SIGTERM:\n{logs[-4000:]}"
        assert CLIENT_SECRET not in logs
    finally:
        await _podman(env, "rm", "--force", "--ignore", name, check=False)


@pytest.mark.browser
async def test_the_image_serves_a_chromium_login_read_only_as_uid_10001_with_redis(
    image: str, podman_env: dict[str, str], redis_url: str, page: object, tmp_path: Path
) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    prefix = f"container-test-{port}"
    name = f"gateway-test-{port}"
    async with idp_and_upstream(public) as (issuer, upstream):
        config = tmp_path / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                raw_config(
                    public, issuer, upstream, store=redis_url, session={"key_prefix": prefix}
                )
            )
        )
        async with container(podman_env, image, config, public, name):
            # Who the gateway runs as, inside: the image's USER, not root.
            _, uid = await _podman(podman_env, "exec", name, "id", "-u")
            assert uid.strip() == "10001"
            _, pid1 = await _podman(podman_env, "exec", name, "cat", "/proc/1/cmdline")
            assert pid1.split("\0")[:2] == ["/opt/gateway/bin/python3", "/opt/gateway/bin/gateway"]
            # The image's own HEALTHCHECK (on /oauth2/healthz) passes.
            code, out = await _podman(podman_env, "healthcheck", "run", name, check=False)
            assert code == 0, out

            await chromium_sign_in(page, public + "/hello?from=container")
            await expect(page.locator("#user")).to_have_text("alice")
            assert page.url == public + "/hello?from=container"
            assert "admins,staff" in await page.content()

        client = aioredis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        finally:
            await client.aclose()
        assert keys, "the session is not in the test's Redis"

        # A new container (a rolling restart): the session is still there, no new login.
        async with container(podman_env, image, config, public, name):
            await page.goto(public + "/again")
            await expect(page.locator("#user")).to_have_text("alice")
            assert page.url == public + "/again"


async def test_the_image_declares_user_config_command_and_healthcheck(
    image: str, podman_env: dict[str, str]
) -> None:
    fields = (
        "{{.Config.User}}|{{json .Config.Entrypoint}}|{{json .Config.Cmd}}|"
        "{{json .Config.Env}}|{{json .Config.Healthcheck.Test}}"
    )
    _, out = await _podman(podman_env, "image", "inspect", "--format", fields, image)
    user, entrypoint, cmd, env, health = out.strip().split("|")
    assert user == "10001:10001"
    assert (entrypoint, cmd) == ('["gateway"]', '["run"]')  # `gateway run`, config from env
    assert '"GATEWAY_CONFIG=/etc/gateway/config.yaml"' in env
    assert '"PYTHONDONTWRITEBYTECODE=1"' in env
    assert "/oauth2/healthz" in env and "GATEWAY_HEALTHCHECK_URL" in health
    # The pinned set, nothing else: every distribution in the image is at its pinned version.
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    _, freeze = await _podman(
        podman_env,
        "run",
        "--rm",
        "--read-only",
        "--network",
        "none",
        "--health-interval",
        "disable",
        "--entrypoint",
        "pip",
        image,
        "list",
        "--format",
        "freeze",
        "--exclude",
        "pip",
        "--exclude",
        "setuptools",
    )
    installed = dict(line.split("==") for line in freeze.split() if "==" in line)
    assert installed.pop("gateway") == pyproject_version()
    assert installed, freeze
    for name, version in installed.items():
        assert pins.get(name.lower().replace("_", "-")) == version, (name, version)


def pyproject_version() -> str:
    import tomllib

    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])
