"""End to end: a real `gateway run` process on a real Redis, restarted while it is under load.

SIGTERM must stop accepting, let in-flight requests finish within server.shutdown_timeout
(and no longer), close WebSockets with 1001 and exit 0; the process started next must serve
every session the first one made.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    free_port,
    idp_and_upstream,
    login,
    wait_until_ready,
)

pytestmark = pytest.mark.e2e

DRAIN = 2.0  # server.shutdown_timeout of the gateway under test


@dataclass
class Gateway:
    url: str
    config: Path
    log: Path
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "run", "--config", str(self.config),
                env={"SECRET": CLIENT_SECRET, "PATH": "/usr/bin:/bin"},
                stdout=asyncio.subprocess.DEVNULL, stderr=log)
        try:
            await wait_until_ready(self.url + "/oauth2/readyz")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; gateway log:\n{self.log.read_text()}") from None

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout=DRAIN + 10)


@pytest.fixture
async def gateway(redis_url: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with idp_and_upstream(url) as (idp, upstream):
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump({
            "server": {"listen": f"127.0.0.1:{port}", "public_url": url,
                       "shutdown_timeout": f"{DRAIN}s"},
            "oidc": {"issuer": idp, "client_id": CLIENT_ID, "client_secret": "${SECRET}"},
            "session": {"store": redis_url},
            "routes": [{"name": "app", "upstream": upstream}],
        }))
        gw = Gateway(url, config, tmp_path / "gateway.log")
        await gw.start()
        try:
            yield gw
        finally:
            if gw.proc is not None and gw.proc.returncode is None:
                gw.proc.kill()
                await gw.proc.wait()


async def test_sigterm_drains_in_flight_work_closes_websockets_and_exits_zero(
        gateway: Gateway, browser: aiohttp.ClientSession) -> None:
    await login(browser, gateway.url, "/echo")
    streams = [asyncio.create_task(_read(browser, gateway.url + "/stream?chunks=6&delay=0.2"))
               for _ in range(10)]
    too_long = asyncio.create_task(_read(browser, gateway.url + "/stream?chunks=100&delay=0.1"))
    ws = await browser.ws_connect(gateway.url + "/ws")
    await asyncio.sleep(0.3)  # every request is in flight
    started = time.monotonic()
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGTERM)

    closing = await asyncio.wait_for(ws.receive(), timeout=DRAIN + 2)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.close_code == 1001
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as fresh:  # no longer accepting
        with pytest.raises(aiohttp.ClientConnectionError):
            await fresh.get(gateway.url + "/oauth2/healthz")
    expected = "".join(f"chunk {i}\n" for i in range(6))
    assert await asyncio.gather(*streams) == [expected] * 10  # in flight: completed
    assert await asyncio.wait_for(gateway.proc.wait(), timeout=DRAIN + 5) == 0
    assert time.monotonic() - started < DRAIN + 3  # the 10 s stream did not hold it up
    with pytest.raises(aiohttp.ClientPayloadError):
        await too_long  # cut at the drain timeout
    await ws.close()
    log = gateway.log.read_text()
    assert "gateway_stopping" in log and "session_store_in_memory" not in log


async def test_restart_under_load_loses_no_session_and_lets_no_one_in(
        gateway: Gateway, browser: aiohttp.ClientSession) -> None:
    await login(browser, gateway.url, "/echo")
    stop = asyncio.Event()
    seen: list[int | str] = []

    async def keep_asking(session: aiohttp.ClientSession, expect_user: str | None) -> None:
        while not stop.is_set():
            try:
                async with session.get(gateway.url + "/echo", allow_redirects=False,
                                       headers={"Accept": "application/json"}) as resp:
                    body = await resp.json() if resp.status == 200 else None
                    user = dict(body["headers"]).get("X-Forwarded-User") if body else None
                    assert resp.status == (200 if expect_user else 401), resp.status
                    assert user == expect_user
                    seen.append(resp.status)
            except aiohttp.ClientConnectionError:
                seen.append("refused")  # between the two processes: nobody is listening
                await asyncio.sleep(0.02)

    async with aiohttp.ClientSession() as anonymous:
        workers = [asyncio.create_task(keep_asking(browser, "alice")) for _ in range(4)]
        workers += [asyncio.create_task(keep_asking(anonymous, None)) for _ in range(2)]
        await asyncio.sleep(0.5)
        assert await gateway.stop() == 0
        await gateway.start()
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)  # re-raises any wrong answer
    assert seen.count(200) > 20 and seen.count(401) > 5
    async with browser.get(gateway.url + "/oauth2/userinfo") as resp:
        assert resp.status == 200 and (await resp.json())["user"] == "alice"
    assert await gateway.stop() == 0


async def _read(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        assert resp.status == 200
        return await resp.text()
