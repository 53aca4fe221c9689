"""The command line: exit codes, one-line config errors, and `gateway run` under SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import CLIENT_ID, CLIENT_SECRET, free_port, raw_config, serve

from gateway import __version__
from gateway.cli import main
from gateway.demo.idp import DemoClient, create_idp_app
from gateway.demo.upstream import create_upstream_app

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, **server: object) -> Path:
    port = free_port()
    raw = {
        "server": {"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}",
                   **server},
        "oidc": {"issuer": f"http://127.0.0.1:{free_port()}", "client_id": "c",
                 "client_secret": "${GW_TEST_SECRET}"},
        "routes": [{"name": "app", "upstream": "http://127.0.0.1:9", "auth": "public"}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def start_gateway(path: Path, port: str) -> asyncio.subprocess.Process:
    """`gateway run` in a child process, once it answers its health check."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(path),
        env={"GW_TEST_SECRET": "s" * 32, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(f"http://127.0.0.1:{port}/oauth2/healthz"):
                    return proc
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    proc.kill()
    await proc.communicate()
    raise AssertionError("gateway run did not start serving")


def test_check_config_accepts_the_example(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GW_CLIENT_SECRET", "x" * 32)
    assert main(["check-config", "--config", str(ROOT / "config.example.yaml")]) == 0
    assert "config OK" in capsys.readouterr().out


def test_check_config_names_the_key_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("X", "s" * 32)
    path = tmp_path / "bad.yaml"
    path.write_text("server: {public_url: 'http://x', lisen: 'a'}\n"
                    "oidc: {issuer: 'http://i', client_id: c, client_secret: '${X}'}\n"
                    "routes: [{name: a, upstream: 'http://u'}]\n")
    assert main(["check-config", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "config error: server.lisen: unknown key"


def test_check_config_prints_warnings_and_still_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("X", "s" * 32)
    path = tmp_path / "warned.yaml"
    path.write_text("server: {public_url: 'http://x'}\n"
                    "oidc: {issuer: 'http://i', client_id: c, client_secret: '${X}'}\n"
                    "routes: [{name: admin, path_prefix: /admin, upstream: 'http://u',"
                    " allow: {groups: [admins]}},\n"
                    "         {name: reports, path_prefix: /admin/reports, auth: public,"
                    " upstream: 'http://u'}]\n")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == "config OK: 2 route(s)"
    assert out.out.splitlines()[1].startswith("store namespace: gateway:")
    warnings = out.err.strip().splitlines()
    assert [w.split(":", 2)[1].strip() for w in warnings] == [
        "routes[admin].allow[0].groups", "routes[reports]"]
    assert all(w.startswith("warning: ") for w in warnings)


def test_check_config_refuses_an_empty_secret(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GW_CLIENT_SECRET", "")
    assert main(["check-config", "--config", str(ROOT / "config.example.yaml")]) == 1
    assert capsys.readouterr().err.startswith("config error: oidc.client_secret: is empty")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gateway {__version__}"


def test_check_config_reads_gateway_config_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(write_config(tmp_path)))
    monkeypatch.setenv("GW_TEST_SECRET", "s" * 32)
    assert main(["check-config"]) == 0
    monkeypatch.delenv("GW_TEST_SECRET")
    assert main(["check-config"]) == 1


def test_missing_config_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    assert main(["check-config"]) == 1
    assert "no config file given" in capsys.readouterr().err
    assert main(["check-config", "--config", "/nonexistent.yaml"]) == 1
    assert "cannot read /nonexistent.yaml" in capsys.readouterr().err


async def test_run_on_a_taken_port_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, listen=f"127.0.0.1:{port}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(path),
            env={"GW_TEST_SECRET": "s" * 32, "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 1
    assert err.decode().splitlines()[-1] == (
        f"config error: server.listen: cannot listen on 127.0.0.1:{port} "
        "(address already in use)")
    assert b"Traceback" not in err


async def test_run_serves_until_sigterm_and_exits_zero(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    port = yaml.safe_load(path.read_text())["server"]["listen"].rsplit(":", 1)[1]
    proc = await start_gateway(path, port)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/oauth2/healthz") as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=15)
        _, err = await proc.communicate()
    assert code == 0, err.decode()
    assert b"gateway_starting" in err
    assert b"session_store_in_memory" in err  # the default store is per process: say so


def redis_config(tmp_path: Path, redis_url: str) -> Path:
    path = write_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["session"] = {"store": redis_url}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The sessions commands set up the process's logging (their audit lines): undo it, so
    later tests' log capture still sees the gateway's loggers."""
    logger = logging.getLogger("gateway")
    kept = (list(logger.handlers), logger.propagate, logger.level)
    aiohttp_handlers = list(logging.getLogger("aiohttp").handlers)
    yield
    logger.handlers[:], logger.propagate, logger.level = kept[0], kept[1], kept[2]
    logging.getLogger("aiohttp").handlers[:] = aiohttp_handlers


async def test_sessions_list_and_revoke_by_user(tmp_path: Path, redis_url: str,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from gateway import config as config_module
    from gateway.identity import Identity
    from gateway.oidc.token_set import TokenSet
    from gateway.sessions.backends import open_backend
    from gateway.sessions.registry import Browser
    from gateway.sessions.store import SessionStore

    monkeypatch.setenv("GW_TEST_SECRET", "s" * 32)
    path = redis_config(tmp_path, redis_url)
    config = config_module.load(path, {"GW_TEST_SECRET": "s" * 32})
    backend = open_backend(config.session, clock=time.time)
    await backend.delete(*await backend.keys("gateway:"))  # other tests' sessions (our server)
    store = SessionStore(backend, config.store_keys, idle_timeout=600, max_lifetime=3600,
                         clock=time.time)
    tokens = TokenSet("secret-access-token", "secret-id-token")
    alice = await store.create(Identity("alice", "alice@example.com", True), tokens,
                               Browser("192.0.2.1", "Firefox/1"))
    bob = await store.create(Identity("bob", "bob@example.com", True), tokens)
    try:
        assert config.session.store == redis_url
        loop = asyncio.get_running_loop()
        cli = functools.partial(loop.run_in_executor, None, main)
        assert await cli(["sessions", "list", "--config", str(path), "--user", "alice"]) == 0
        out = capsys.readouterr().out
        assert "alice@example.com" in out and "192.0.2.1" in out and "Firefox/1" in out
        assert "bob" not in out and "secret" not in out
        assert out.strip().endswith("1 session(s)")
        assert await cli(["sessions", "revoke", "--config", str(path)]) == 2  # usage error
        err = capsys.readouterr().err
        assert "usage: gateway sessions revoke" in err and "config error" not in err
        assert await cli(["sessions", "revoke", "--config", str(path),
                          "--user", "alice@example.com"]) == 0
        out, err = capsys.readouterr()
        assert "revoked 1 session(s)" in out
        assert "gateway.audit session_revoked by=admin sessions=1 user=alice@example.com " \
            "session=None all=False" in err
        assert await store.load(alice.value) is None
        assert await store.load(bob.value) is not None
        assert await cli(["sessions", "revoke", "--all", "--config", str(path)]) == 0
        assert await store.load(bob.value) is None
    finally:
        await backend.aclose()


async def test_sessions_list_shows_ids_idle_expiry_and_json_and_revokes_one_by_id(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Ops list and revoke without the client secret: they never talk to the IdP."""
    from gateway import config as config_module
    from gateway.identity import Identity
    from gateway.oidc.token_set import TokenSet
    from gateway.sessions.backends import open_backend
    from gateway.sessions.registry import Browser
    from gateway.sessions.store import SessionStore

    monkeypatch.delenv("GW_TEST_SECRET", raising=False)
    path = redis_config(tmp_path, redis_url)
    config = config_module.load(path, {"GW_TEST_SECRET": "s" * 32})
    backend = open_backend(config.session, clock=time.time)
    await backend.delete(*await backend.keys("gateway:"))
    store = SessionStore(backend, config.store_keys, idle_timeout=600, max_lifetime=3600,
                         clock=time.time)
    tokens = TokenSet("secret-access-token", "secret-id-token")
    first = await store.create(Identity("carol", "carol@example.com", True), tokens,
                               Browser("198.51.100.4", "curl/8"))
    second = await store.create(Identity("carol", "carol@example.com", True), tokens)
    cli = functools.partial(asyncio.get_running_loop().run_in_executor, None, main)
    try:
        assert await cli(["sessions", "list", "--config", str(path)]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:5] == ["session", "created", "last", "seen", "idle"]
        assert first.storage_id[:12] in "\n".join(table) and "198.51.100.4" in table[1] + table[2]
        assert await cli(["sessions", "list", "--json", "--config", str(path)]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert {entry["session"] for entry in listed} == {first.storage_id, second.storage_id}
        entry = next(e for e in listed if e["session"] == first.storage_id)
        assert entry["client_ip"] == "198.51.100.4" and entry["user"] == "carol"
        assert entry["idle_until"] < entry["expires"]  # 600 s idle, 3600 s at most
        assert "secret" not in json.dumps(listed)
        assert await cli(["sessions", "revoke", "--session", first.storage_id[:10],
                          "--config", str(path)]) == 0
        assert "revoked 1 session(s)" in capsys.readouterr().out
        assert await store.load(first.value) is None
        assert await store.load(second.value) is not None
        for bad in ("", "abc", "not-hex!"):  # never 'every session' by accident
            assert await cli(["sessions", "revoke", "--session", bad, "--config", str(path)]) == 2
        assert "usage: gateway sessions revoke" in capsys.readouterr().err
        assert await store.load(second.value) is not None
        assert await cli(["sessions", "revoke", "--session", first.storage_id,
                          "--config", str(path)]) == 1  # named, but nothing left to revoke
        assert await cli(["sessions", "list", "--user", "carol", "--session", "abcdef",
                          "--config", str(path)]) == 2  # one or the other
    finally:
        await backend.aclose()


def test_a_session_prefix_that_names_several_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio as aio

    from gateway import admin
    from gateway.sessions.registry import SessionInfo

    class Two:
        async def all(self) -> list[SessionInfo]:
            return [SessionInfo(f"abcdef{i}", "u", None, None, 0, 0, 0, "-", "-") for i in (1, 2)]

    with pytest.raises(admin.UsageError, match="names 2 sessions"):
        aio.run(admin._select(Two(), None, "abcdef"))  # type: ignore[arg-type]


def test_sessions_commands_refuse_the_memory_store(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GW_TEST_SECRET", "s" * 32)
    assert main(["sessions", "list", "--config", str(write_config(tmp_path))]) == 1
    assert "need a Redis store" in capsys.readouterr().err


async def test_shutdown_delay_keeps_serving_while_readyz_says_draining(tmp_path: Path) -> None:
    """Kubernetes removes a pod from its endpoints only after SIGTERM: requests that arrive
    meanwhile must still be served, not refused."""
    path = write_config(tmp_path, shutdown_delay="1500ms")
    port = yaml.safe_load(path.read_text())["server"]["listen"].rsplit(":", 1)[1]
    proc = await start_gateway(path, port)
    base = f"http://127.0.0.1:{port}/oauth2"
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as http:  # new connections, during the delay
        async with http.get(base + "/healthz") as resp:
            assert resp.status == 200
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 503
            assert await resp.json() == {"status": "draining"}
    assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
    assert time.monotonic() - started >= 1.4
    _, err = await proc.communicate()
    assert b"gateway_draining" in err


async def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    """Graceful shutdown: a response being streamed when SIGTERM arrives is completed."""
    upstream_runner, upstream = await serve(create_upstream_app())
    path = write_config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["routes"][0]["upstream"] = upstream
    path.write_text(yaml.safe_dump(raw))
    port = raw["server"]["listen"].rsplit(":", 1)[1]
    proc = await start_gateway(path, port)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/stream?chunks=4&delay=0.3") as resp:
                first = await resp.content.readline()
                proc.send_signal(signal.SIGTERM)  # mid-response
                rest = await resp.read()
        assert first + rest == b"chunk 0\nchunk 1\nchunk 2\nchunk 3\n"
        code = await asyncio.wait_for(proc.wait(), timeout=15)
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()
        await upstream_runner.cleanup()


async def test_a_second_signal_during_the_drain_stops_at_once(tmp_path: Path) -> None:
    upstream_runner, upstream = await serve(create_upstream_app())
    path = write_config(tmp_path, shutdown_timeout="30s")
    raw = yaml.safe_load(path.read_text())
    raw["routes"][0]["upstream"] = upstream
    path.write_text(yaml.safe_dump(raw))
    port = raw["server"]["listen"].rsplit(":", 1)[1]
    proc = await start_gateway(path, port)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/stream?chunks=100&delay=0.5") as resp:
                await resp.content.readline()
                proc.send_signal(signal.SIGTERM)  # drain: up to 30 s for this stream
                await asyncio.sleep(0.5)
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)  # enough
                assert await asyncio.wait_for(proc.wait(), timeout=5) == 1
                assert time.monotonic() - started < 3
        _, err = await proc.communicate()
        assert b"gateway_stopping_now" in err
    finally:
        if proc.returncode is None:
            proc.kill()
        await upstream_runner.cleanup()


def test_the_table_shows_no_control_sequence_and_survives_any_value() -> None:
    """A browser chooses its User-Agent: a surrogate made `sessions list` crash on a UTF-8
    terminal, and a C1 CSI would have reached the screen."""
    from gateway.admin import Row, format_table
    from gateway.sessions.registry import Browser, SessionInfo

    hostile = "a\udc9bb\x9b2J\x1b[31m\u202e"
    info = SessionInfo("ab" * 32, hostile, hostile, None, 0, 0, 0, hostile, hostile)
    table = format_table([Row(info, None)])
    table.encode("ascii")  # nothing but ASCII, so any terminal encoding takes it
    assert "\x9b" not in table and "\x1b" not in table
    seen = Browser.seen("10.0.0.1\x9b", "Mozilla\x1b[2J\udc9b" + "x" * 300)
    assert seen.ip == "10.0.0.1?" and seen.user_agent.startswith("Mozilla?[2J?")
    assert len(seen.user_agent) == 200


async def test_check_config_online_asks_the_idp_the_store_and_every_upstream(
        tmp_path: Path, redis_url: str) -> None:
    idp_port, gw_port = free_port(), free_port()
    idp = f"http://127.0.0.1:{idp_port}"
    gateway = f"http://127.0.0.1:{gw_port}"
    idp_runner, _ = await serve(create_idp_app(idp, [DemoClient(CLIENT_ID, CLIENT_SECRET, (
        gateway + "/oauth2/callback",))]), idp_port)
    upstream_runner, upstream = await serve(create_upstream_app())
    dead = f"http://127.0.0.1:{free_port()}"

    async def run(routes: list[dict[str, object]], store: str) -> tuple[int, str]:
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(raw_config(gateway, idp, upstream, store=store,
                                                  routes=routes)))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "check-config", "--online", "--config",
            str(path), env={"SECRET": CLIENT_SECRET, "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    try:
        status, out = await run([
            {"name": "admin", "path_prefix": "/admin", "allow": {"groups": ["admins"]}},
            {"name": "public", "path_prefix": "/public", "auth": "public"},
            {"name": "app", "path_prefix": "/"}], redis_url)
        assert status == 0, out
        assert f"idp    ok   {idp} (1 signing key(s)" in out
        assert "store  ok   redis, namespace gateway:" in out
        assert re.search(r"^admin +\* +/admin +1 allow rule\(s\) +http\S+ +ok \(\d+\)$", out,
                         re.M), out
        assert re.search(r"^public +\* +/public +public ", out, re.M), out
        status, out = await run([{"name": "gone", "path_prefix": "/", "upstream": dead}],
                                f"redis://127.0.0.1:{free_port()}/0")
        assert status == 1
        assert re.search(r"^store  FAIL redis: ", out, re.M), out
        assert re.search(r"^gone .* FAIL: ClientConnectorError$", out, re.M), out
    finally:
        await upstream_runner.cleanup()
        await idp_runner.cleanup()
