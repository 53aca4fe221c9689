"""server.workers: `gateway run` as a supervisor of worker processes on one port, on a real
Redis. A worker killed under load is replaced and the service keeps answering; SIGTERM
drains them all."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    free_port,
    idp_and_upstream,
    login,
    raw_config,
    start_gateway,
    wait_until_ready,
)

pytestmark = pytest.mark.e2e


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(child) for child in text.split()}


@contextlib.asynccontextmanager
async def supervised(tmp_path: Path, redis_url: str, workers: int, *,
                     server: dict[str, str] | None = None, **session: str
                     ) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    gateway = f"http://127.0.0.1:{free_port()}"
    async with idp_and_upstream(gateway) as (idp, upstream):
        config = raw_config(gateway, idp, upstream, store=redis_url,
                            server={"workers": workers, "shutdown_timeout": "5s",
                                    **(server or {})},
                            session=session)
        proc = await start_gateway(config, tmp_path / "gateway.yaml",
                                   log=tmp_path / "gateway.log")
        try:
            await wait_until_ready(gateway + "/oauth2/readyz")
            yield gateway, proc
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def hammer(url: str, cookie: str, until: float, outcomes: Counter[str],
                 times: list[tuple[float, str]]) -> None:
    """Requests one after another, each on a new connection (so the kernel spreads them
    over the workers), until `until`; what each came to is counted."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector,
                                     cookies={"gateway_session": cookie}) as http:
        while time.monotonic() < until:
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    await resp.read()
                    outcome = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            outcomes[outcome] += 1
            times.append((time.monotonic(), outcome))


async def test_a_worker_killed_under_load_is_replaced_and_the_service_keeps_answering(
        tmp_path: Path, redis_url: str, browser: aiohttp.ClientSession) -> None:
    async with supervised(tmp_path, redis_url, workers=2) as (gateway, proc):
        first = children(proc.pid)
        assert len(first) == 2
        await login(browser, gateway, "/echo")
        cookie = next(c.value for c in browser.cookie_jar if c.key == "gateway_session")
        outcomes: Counter[str] = Counter()
        times: list[tuple[float, str]] = []
        start = time.monotonic()
        load = [asyncio.create_task(hammer(gateway + "/echo", cookie, start + 6, outcomes,
                                           times)) for _ in range(6)]
        await asyncio.sleep(1.5)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.gather(*load)
        now = children(proc.pid)
        assert len(now) == 2 and victim not in now  # replaced
        assert outcomes["200"] > 100, outcomes
        # Only requests the killed worker held at that moment can fail: at most one per
        # client loop. Everything later (queued connections included) is answered.
        failed = [t for t, outcome in times if outcome != "200"]
        assert len(failed) <= 6, outcomes
        assert all(t < killed_at + 0.5 for t in failed), (killed_at, failed)
        assert any(t > killed_at + 1 and outcome == "200" for t, outcome in times)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
        assert not any(alive(pid) for pid in now)
        log = (tmp_path / "gateway.log").read_text()
        assert "gateway_worker_died slot=" in log and f"pid={victim} status=-9" in log


async def test_workers_of_a_supervisor_killed_outright_drain_and_exit(
        tmp_path: Path, redis_url: str) -> None:
    """SIGKILL leaves the supervisor no chance to pass anything on: its workers notice it
    gone (their lifeline pipe closes) and stop, rather than keep serving the port with the
    configuration they started with beside whatever runs next."""
    async with supervised(tmp_path, redis_url, workers=2) as (gateway, proc):
        workers = children(proc.pid)
        assert len(workers) == 2
        async with aiohttp.ClientSession() as http, http.get(gateway + "/public/echo") as resp:
            assert resp.status == 200
        proc.kill()
        await proc.wait()
        for _ in range(100):  # 10 s at most
            if not any(alive(pid) for pid in workers):
                break
            await asyncio.sleep(0.1)
        assert not any(alive(pid) for pid in workers)
        with pytest.raises(aiohttp.ClientConnectorError):  # nobody serves the port
            async with aiohttp.ClientSession() as http:
                await http.get(gateway + "/public/echo")
        log = (tmp_path / "gateway.log").read_text()
        assert log.count("gateway_supervisor_gone pid=") == 2, log


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


async def test_every_worker_serves_and_all_drain_on_sigterm(
        tmp_path: Path, redis_url: str) -> None:
    async with supervised(tmp_path, redis_url, workers=3) as (gateway, proc):
        workers = children(proc.pid)
        assert len(workers) == 3
        before = {pid: cpu_ticks(pid) for pid in workers}
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            async def some() -> None:
                for _ in range(150):  # new connections: SO_REUSEPORT spreads them
                    async with http.get(gateway + "/public/echo") as resp:
                        assert resp.status == 200
                        await resp.read()
            await asyncio.gather(*(some() for _ in range(4)))
        worked = {pid: cpu_ticks(pid) - before[pid] for pid in workers}
        assert all(ticks > 0 for ticks in worked.values()), worked
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
        assert not any(alive(pid) for pid in workers)


async def test_with_the_session_cache_a_sign_out_reaches_every_worker_at_once(
        tmp_path: Path, redis_url: str, browser: aiohttp.ClientSession) -> None:
    """cache_ttl is 10 s, yet every worker refuses the session well within 1 s: the
    invalidation channel, not the cache's age, ends it."""
    async with supervised(tmp_path, redis_url, workers=3, cache_ttl="10s") as (gateway, _):
        await login(browser, gateway, "/echo")
        cookie = next(c.value for c in browser.cookie_jar if c.key == "gateway_session")
        connector = aiohttp.TCPConnector(force_close=True)  # new connections: every worker
        async with aiohttp.ClientSession(connector=connector,
                                         cookies={"gateway_session": cookie}) as http:
            async def status() -> int:
                async with http.get(gateway + "/echo") as resp:
                    await resp.read()
                    return resp.status
            assert {await status() for _ in range(60)} == {200}  # every worker has it cached
            async with browser.get(gateway + "/oauth2/sign_out",
                                   allow_redirects=False) as resp:
                assert resp.status == 302
            signed_out = time.monotonic()
            last_served = signed_out
            while time.monotonic() < signed_out + 2.5:
                statuses = await asyncio.gather(*(status() for _ in range(6)))
                if 200 in statuses:
                    last_served = time.monotonic()
                assert set(statuses) <= {200, 401}
            assert last_served - signed_out < 0.5, last_served - signed_out


async def test_serving_processes_run_on_uvloop_and_relay_websockets_on_it(
        tmp_path: Path, redis_url: str, browser: aiohttp.ClientSession) -> None:
    """server.event_loop's default in a real `gateway run`: every worker says which loop it
    serves on, and the WebSocket relay (transports handed over, flow control, the 1008 close
    at a frame boundary) works on uvloop's transports as on asyncio's."""
    async with supervised(tmp_path, redis_url, workers=2) as (gateway, proc):
        await login(browser, gateway, "/echo")
        async with browser.ws_connect(gateway + "/ws", max_msg_size=0) as ws:
            big = os.urandom(3 << 20)
            await ws.send_bytes(big)
            assert (await ws.receive(timeout=10)).data == big
            async with browser.post(gateway + "/oauth2/sign_out", allow_redirects=False,
                                    headers={"Origin": gateway}) as resp:
                assert resp.status == 302
            message = await asyncio.wait_for(ws.receive(), timeout=5)
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1008)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
    log = (tmp_path / "gateway.log").read_text()
    assert log.count("gateway_serving listen=") == 2
    assert log.count("event_loop=uvloop") == 2
    assert "gateway_supervisor_gone" not in log  # its lifeline closed as it exited: not that


async def test_event_loop_asyncio_serves_on_the_standard_librarys_loop(
        tmp_path: Path, redis_url: str) -> None:
    async with supervised(tmp_path, redis_url, workers=1,
                          server={"event_loop": "asyncio"}) as (_, proc):
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
    assert "event_loop=asyncio" in (tmp_path / "gateway.log").read_text()
