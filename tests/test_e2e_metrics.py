"""server.metrics_listen: `gateway run` (one process, and a supervisor of two workers) on a
real Redis, scraped over HTTP after real sign-ins, proxied requests, refusals, WebSockets,
sign-outs and reloads. The numbers are compared as exact differences between scrapes."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import (
    GATEWAY_ENV,
    free_port,
    idp_and_upstream,
    login,
    raw_config,
    start_gateway,
    wait_until_ready,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import ConfigError
from gateway.metrics import FLUSH_AFTER, WorkerMetrics

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Running:
    gateway: str
    metrics: str
    proc: asyncio.subprocess.Process
    config_path: Path
    log: Path


@contextlib.asynccontextmanager
async def running(tmp_path: Path, redis_url: str, *, workers: int = 1
                  ) -> AsyncIterator[Running]:
    port, metrics_port = free_port(), free_port()
    gateway = f"http://127.0.0.1:{port}"
    async with idp_and_upstream(gateway) as (idp, upstream):
        config = raw_config(gateway, idp, upstream, store=redis_url,
                            server={"workers": workers, "shutdown_timeout": "5s",
                                    "metrics_listen": f"127.0.0.1:{metrics_port}"})
        path, log = tmp_path / "gateway.yaml", tmp_path / "gateway.log"
        # TMPDIR: where a supervisor makes its workers' metrics directory, for the test
        proc = await start_gateway(config, path, log=log,
                                   env={**GATEWAY_ENV, "TMPDIR": str(tmp_path)})
        try:
            await wait_until_ready(gateway + "/oauth2/readyz")
            await wait_until_ready(f"http://127.0.0.1:{metrics_port}/metrics")
            yield Running(gateway, f"http://127.0.0.1:{metrics_port}/metrics", proc, path, log)
        finally:
            if proc.returncode is None:
                proc.terminate()
                assert await asyncio.wait_for(proc.wait(), timeout=15) == 0, log.read_text()


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def found(directory: Path, pattern: str) -> list[Path]:
    return list(directory.glob(pattern))


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value, 0 when it does not exist yet; labels not named are summed over."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


async def new_connection_get(url: str, cookies: dict[str, str] | None = None) -> int:
    """On a connection of its own, so that with workers the kernel may pick any of them."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, cookies=cookies) as http:
        async with http.get(url, allow_redirects=False) as resp:
            await resp.read()
            return resp.status


async def sign_in_out_and_browse(gw: Running, browser: aiohttp.ClientSession
                                 ) -> tuple[Samples, Samples]:
    """A sign-in, 3 proxied requests, 2 refusals, a WebSocket, a sign-out: the scrapes
    before and after."""
    before = await scrape(gw.metrics)
    await login(browser, gw.gateway, "/echo", user="bob")  # 302 sign_in, then a proxied 200
    cookie = {c.key: c.value for c in browser.cookie_jar}["gateway_session"]
    for _ in range(2):
        assert await new_connection_get(gw.gateway + "/echo/x",
                                        {"gateway_session": cookie}) == 200
    for _ in range(2):
        assert await new_connection_get(gw.gateway + "/admin/",
                                        {"gateway_session": cookie}) == 403
    async with browser.ws_connect(gw.gateway + "/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive()).data == "echo:hi"
        during = await scrape(gw.metrics)
        assert value(during, "gateway_websockets_active") == 1
    async with browser.post(gw.gateway + "/oauth2/sign_out", allow_redirects=False,
                            headers={"Origin": gw.gateway}) as resp:
        assert resp.status == 302
    await asyncio.sleep(FLUSH_AFTER + 0.5)  # a worker hands its requests on by then
    return before, await scrape(gw.metrics)


def assert_counted(before: Samples, after: Samples) -> None:
    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("gateway_logins_total", stage="started") == 1
    assert delta("gateway_logins_total", stage="completed") == 1
    assert delta("gateway_logins_total", stage="failed") == 0
    assert delta("gateway_requests_total", route="app", status_class="2xx",
                 outcome="proxied") == 3
    assert delta("gateway_requests_total", route="app", status_class="3xx",
                 outcome="sign_in") == 1
    assert delta("gateway_requests_total", route="admin", status_class="4xx",
                 outcome="denied") == 2
    assert delta("gateway_requests_total", route="app", status_class="1xx",
                 outcome="proxied") == 1  # the WebSocket's 101
    # the 3 proxied requests and the WebSocket's handshake, an upstream round trip too
    assert delta("gateway_upstream_duration_seconds_count", route="app") == 4
    assert delta("gateway_request_duration_seconds_count", route="admin") == 2
    assert delta("gateway_logouts_total", kind="sign_out") == 1
    assert value(after, "gateway_websockets_active") == 0
    # the session loads (the session cache answers most), the sign-in's writes (its login
    # attempt, then the new session in one pipeline): Redis was asked, and never failed
    assert delta("gateway_store_duration_seconds_count", operation="GET") >= 1
    assert delta("gateway_store_duration_seconds_count", operation="SET") >= 1
    assert delta("gateway_store_duration_seconds_count", operation="SET indexed") == 1
    assert value(after, "gateway_store_errors_total") == 0
    assert value(after, "gateway_idp_fetches_total", document="discovery", result="ok") >= 1
    assert value(after, "gateway_idp_fetches_total", document="jwks", result="ok") >= 1


async def test_metrics_count_sign_ins_requests_refusals_websockets_and_sign_outs(
        tmp_path: Path, redis_url: str, browser: aiohttp.ClientSession) -> None:
    async with running(tmp_path, redis_url) as gw:
        before, after = await sign_in_out_and_browse(gw, browser)
        assert_counted(before, after)
        # a failed sign-in is counted with its reason
        assert await new_connection_get(gw.gateway + "/oauth2/callback?state=forged&code=x") \
            == 400
        failed = await scrape(gw.metrics)
        assert value(failed, "gateway_logins_total", stage="failed",
                     reason="unknown_state") == 1


async def test_metrics_are_never_on_the_public_port(tmp_path: Path, redis_url: str) -> None:
    async with running(tmp_path, redis_url) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.gateway + "/metrics", allow_redirects=False) as resp:
            assert resp.status == 401  # the catch-all route wants a session: no numbers
            assert "gateway_requests_total" not in await resp.text()


async def test_two_workers_are_scraped_as_one_gateway_and_each_counts_its_reload(
        tmp_path: Path, redis_url: str, browser: aiohttp.ClientSession) -> None:
    async with running(tmp_path, redis_url, workers=2) as gw:
        before, after = await sign_in_out_and_browse(gw, browser)
        assert_counted(before, after)
        # 20 more, each on a new connection: the kernel spreads them over both workers (all
        # on one would be a 1 in 500,000 chance), and one scrape sees them all
        for _ in range(20):
            assert await new_connection_get(gw.gateway + "/public/x") == 200
        await asyncio.sleep(FLUSH_AFTER + 0.5)
        spread = await scrape(gw.metrics)
        assert value(spread, "gateway_requests_total", route="public") - \
            value(after, "gateway_requests_total", route="public") == 20
        counted_by = {p.stem.rsplit("_", 1)[1]
                      for p in found(tmp_path, "gateway-metrics-*/counter_*.db")}
        assert len(counted_by) == 2, counted_by
        config = yaml.safe_load(gw.config_path.read_text())
        config["routes"].insert(0, {"name": "added", "path_prefix": "/added",
                                    "upstream": config["routes"][0]["upstream"],
                                    "auth": "public"})
        gw.config_path.write_text(yaml.safe_dump(config))
        gw.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            reloaded = await scrape(gw.metrics)
            if value(reloaded, "gateway_config_reloads_total", result="applied") == 2:
                break
            await asyncio.sleep(0.1)
        assert value(reloaded, "gateway_config_reloads_total", result="applied") == 2
        assert value(reloaded, "gateway_config_reloads_total", result="refused") == 0
    # the supervisor removed the workers' files when it stopped
    assert not found(tmp_path, "gateway-metrics-*")


async def test_a_metrics_address_that_is_taken_is_a_config_error(tmp_path: Path) -> None:
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = free_port()
        config = raw_config(f"http://127.0.0.1:{port}", "http://127.0.0.1:9",
                            "http://127.0.0.1:9", server={
                                "metrics_listen": f"127.0.0.1:{taken.getsockname()[1]}"})
        proc = await start_gateway(config, tmp_path / "gateway.yaml", log=tmp_path / "log")
        assert await asyncio.wait_for(proc.wait(), timeout=15) == 1
    assert "config error: server.metrics_listen: cannot listen on 127.0.0.1:" in \
        (tmp_path / "log").read_text()



def test_workers_without_a_writable_temporary_directory_is_a_config_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only root filesystem without a writable /tmp (a root test process cannot be
    refused a directory, so the refusal is made here)."""
    def refuse(**_: object) -> str:
        raise FileNotFoundError(2, "No usable temporary directory found")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ConfigError) as refused:
        WorkerMetrics()
    assert str(refused.value) == (
        "server.metrics_listen: with server.workers the workers' metrics need a writable "
        "temporary directory ($TMPDIR or /tmp): No usable temporary directory found")
