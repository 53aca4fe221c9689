"""Live reload: `gateway run` re-reads its config on SIGHUP (or `gateway reload`), applies a
valid one whole, refuses an invalid one, names what needs a restart, and lets requests in
flight finish on the config they started with; with workers, every worker switches."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import (
    GATEWAY_ENV,
    free_port,
    idp_and_upstream,
    raw_config,
    start_gateway,
    wait_until_ready,
)

pytestmark = pytest.mark.e2e

ENV = GATEWAY_ENV


class Running:
    def __init__(self, url: str, config: dict[str, Any], path: Path, log: Path,
                 proc: asyncio.subprocess.Process) -> None:
        self.url, self.config, self.path, self.log, self.proc = url, config, path, log, proc

    def write(self, config: dict[str, Any] | str) -> None:
        self.path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))

    async def status(self, path: str) -> int:
        connector = aiohttp.TCPConnector(force_close=True)  # every worker, in turn
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.get(self.url + path, allow_redirects=False) as resp:
            await resp.read()
            return resp.status

    async def until(self, check: Callable[[], Awaitable[bool]]) -> None:
        """Within 5 s."""
        for _ in range(100):
            if await check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"not within 5 s; log:\n{self.log.read_text()[-3000:]}")


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **server: Any) -> AsyncIterator[Running]:
    url = f"http://127.0.0.1:{free_port()}"
    async with idp_and_upstream(url) as (idp, upstream):
        store = server.pop("store", "memory://")
        config = raw_config(url, idp, upstream, store=store, server=server)
        path, log = tmp_path / "gateway.yaml", tmp_path / "gateway.log"
        proc = await start_gateway(config, path, log=log)
        try:
            await wait_until_ready(url + "/oauth2/readyz")
            yield Running(url, config, path, log, proc)
        finally:
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), timeout=20) == 0


def changed(config: dict[str, Any]) -> dict[str, Any]:
    """/public becomes protected; /new appears (public, strip_prefix onto the app's /echo)."""
    routes = [dict(route) for route in config["routes"]]
    for route in routes:
        if route["name"] == "public":
            route["auth"] = "required"
    routes.insert(0, {"name": "new", "path_prefix": "/new", "auth": "public",
                      "strip_prefix": True, "upstream": routes[0]["upstream"]})
    return {**config, "routes": routes}


async def test_sighup_applies_a_valid_config_and_refuses_an_invalid_one(
        tmp_path: Path) -> None:
    async with running(tmp_path) as gw:
        assert await gw.status("/public/echo") == 200
        assert await gw.status("/new/echo") == 401  # the "/" route, signed in only
        gw.write(changed(gw.config))
        gw.proc.send_signal(signal.SIGHUP)

        async def switched() -> bool:
            return await gw.status("/new/echo") == 200
        await gw.until(switched)
        assert await gw.status("/public/echo") == 401
        # Invalid: refused, named in the log, and the running config stays.
        for broken in ("routes: [unclosed", {**gw.config, "routes": [{"name": "x"}]}):
            gw.write(broken)
            gw.proc.send_signal(signal.SIGHUP)
            await gw.until(lambda: _logged(gw, "config_reload_refused"))
            assert await gw.status("/new/echo") == 200
            assert await gw.status("/public/echo") == 401
            gw.log.write_text("")


async def _logged(gw: Running, text: str) -> bool:
    return text in gw.log.read_text()


async def test_what_needs_a_restart_is_named_and_the_rest_applied(tmp_path: Path) -> None:
    async with running(tmp_path) as gw:
        new = changed(gw.config)
        new["server"] = {**new["server"], "listen": f"127.0.0.1:{free_port()}"}
        new["session"] = {**new["session"], "idle_timeout": "5m"}
        gw.write(new)
        gw.proc.send_signal(signal.SIGHUP)
        await gw.until(lambda: _logged(gw, "config_reloaded"))
        log = gw.log.read_text()
        assert "config_reload_needs_restart keys=server.listen,session.idle_timeout" in log
        assert await gw.status("/new/echo") == 200  # applied on the old address
        assert await gw.status("/public/echo") == 401


async def test_a_request_in_flight_finishes_on_the_config_it_started_with(
        tmp_path: Path) -> None:
    async with running(tmp_path) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/public/stream?chunks=8&delay=0.25") as resp:
            assert resp.status == 200
            first = await resp.content.readline()
            # The route is removed while the response streams.
            gw.write({**gw.config, "routes": [r for r in gw.config["routes"]
                                              if r["name"] != "public"]})
            gw.proc.send_signal(signal.SIGHUP)
            await gw.until(lambda: _logged(gw, "config_reloaded"))
            rest = await resp.read()
        assert first == b"chunk 0\n" and rest.count(b"chunk") == 7
        assert await gw.status("/public/echo") == 401  # now under the "/" route


async def test_every_worker_switches_and_gateway_reload_finds_the_supervisor(
        tmp_path: Path, redis_url: str) -> None:
    pid_file = tmp_path / "gateway.pid"
    async with running(tmp_path, store=redis_url, workers=3, pid_file=str(pid_file)) as gw:
        assert int(pid_file.read_text()) == gw.proc.pid
        gw.write(changed(gw.config))
        reload = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "reload", "--config", str(gw.path), env=ENV,
            stdout=asyncio.subprocess.PIPE)
        out, _ = await reload.communicate()
        assert reload.returncode == 0 and b"reload signalled" in out

        async def all_switched() -> bool:
            statuses = await asyncio.gather(*(gw.status("/new/echo") for _ in range(30)))
            return set(statuses) == {200}
        await gw.until(all_switched)
        assert gw.log.read_text().count("config_reloaded") == 3
        # An invalid config is refused by `gateway reload` itself: nothing is signalled.
        gw.write("routes: [")
        reload = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "reload", "--config", str(gw.path), env=ENV,
            stderr=asyncio.subprocess.PIPE)
        _, err = await reload.communicate()
        assert reload.returncode == 1 and b"not valid YAML" in err
    assert not pid_file.exists()


def with_public_route(config: dict[str, Any], name: str) -> dict[str, Any]:
    """`config` plus a public route /<name> onto the app's /echo."""
    route = {"name": name, "path_prefix": f"/{name}", "auth": "public", "strip_prefix": True,
             "upstream": config["routes"][0]["upstream"]}
    return {**config, "routes": [route, *config["routes"]]}


async def test_requests_keep_running_through_five_reloads_valid_and_invalid(
        tmp_path: Path, redis_url: str) -> None:
    async with running(tmp_path, store=redis_url, workers=2) as gw:
        stop = asyncio.Event()
        outcomes: Counter[str] = Counter()

        async def load(new_connections: bool) -> None:
            connector = aiohttp.TCPConnector(force_close=new_connections)
            async with aiohttp.ClientSession(connector=connector) as http:
                while not stop.is_set():
                    try:
                        async with http.get(gw.url + "/public/echo") as resp:
                            await resp.read()
                            outcomes[str(resp.status)] += 1
                    except aiohttp.ClientError as exc:
                        outcomes[type(exc).__name__] += 1

        clients = [asyncio.create_task(load(new_connections=i % 2 == 0)) for i in range(4)]
        steps = [with_public_route(gw.config, "one"), "routes: [unclosed",
                 with_public_route(gw.config, "two"), {**gw.config, "routes": [{"name": "x"}]},
                 with_public_route(gw.config, "three")]
        for done, config in enumerate(steps, start=1):
            gw.write(config)
            gw.proc.send_signal(signal.SIGHUP)

            async def both_workers_answered(done: int = done) -> bool:
                log = gw.log.read_text()
                return log.count("config_reloaded") + log.count("config_reload_refused") \
                    == 2 * done
            await gw.until(both_workers_answered)
            await asyncio.sleep(0.2)  # requests keep coming between reloads
        stop.set()
        await asyncio.gather(*clients)
        assert set(outcomes) == {"200"} and outcomes["200"] > 100, outcomes
        log = gw.log.read_text()
        assert (log.count("config_reloaded"), log.count("config_reload_refused")) == (6, 4)
        statuses = await asyncio.gather(*(gw.status(path) for path in
                                          ("/three/x", "/one/x", "/two/x") for _ in range(10)))
        assert statuses == [200] * 10 + [401] * 20  # the last valid config, on both workers
