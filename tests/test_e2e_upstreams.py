"""End to end: upstreams over HTTPS with a private CA, and on a Unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    StackFactory,
    free_port,
    idp_and_upstream,
    raw_config,
    start_gateway,
    wait_until_ready,
)
from redis_servers import make_certificates

from gateway.demo.upstream import create_upstream_app

pytestmark = pytest.mark.e2e


@pytest.fixture
async def https_upstream(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    ca_file, cert_file, key_file = make_certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    runner = web.AppRunner(create_upstream_app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    yield f"https://127.0.0.1:{port}", ca_file
    await runner.cleanup()


@pytest.fixture
async def unix_upstream(tmp_path: Path) -> AsyncIterator[Path]:
    """The demo upstream on a Unix socket: its path."""
    socket_path = tmp_path / "app.sock"
    runner = web.AppRunner(create_upstream_app(), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(socket_path)).start()
    yield socket_path
    await runner.cleanup()


async def get_status(url: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Accept": "application/json"}) as resp:
            return resp.status


async def test_https_upstream_with_a_private_ca(
        make_stack: StackFactory, https_upstream: tuple[str, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway")
    url, ca_file = https_upstream
    stack = await make_stack(routes=[
        {"name": "trusted", "path_prefix": "/trusted", "upstream": url, "auth": "public",
         "strip_prefix": True, "upstream_tls": {"ca_file": str(ca_file)}},
        {"name": "system-cas", "path_prefix": "/system", "upstream": url, "auth": "public",
         "strip_prefix": True},
        {"name": "unchecked", "path_prefix": "/unchecked", "upstream": url, "auth": "public",
         "strip_prefix": True, "upstream_tls": {"verify": False}},
    ])
    assert await get_status(stack.gateway + "/trusted/echo") == 200
    assert await get_status(stack.gateway + "/system/echo") == 502  # unknown CA: refused
    assert await get_status(stack.gateway + "/unchecked/echo") == 200
    assert "upstream_tls_verify_off route=unchecked" in caplog.text  # and it says so loudly


async def test_unix_socket_upstream(make_stack: StackFactory, unix_upstream: Path) -> None:
    stack = await make_stack(routes=[{"name": "sock", "path_prefix": "/",
                                      "upstream": f"unix:{unix_upstream}", "auth": "public"}])
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/echo?via=socket") as resp:
            assert resp.status == 200
            assert (await resp.json())["query"] == "via=socket"


async def relayed_both_ways(url: str) -> None:
    """A text frame, a 3 MiB binary message (many TLS records, many relay reads) and a close
    code from the app: what the relay passes, over whatever transport reaches the upstream."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, protocols=("chat",), max_msg_size=0) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "echo:hi"
            big = os.urandom(3 << 20)
            await ws.send_bytes(big)
            assert (await ws.receive(timeout=10)).data == big
            await ws.send_str("close:4003")
            message = await ws.receive(timeout=5)
            assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 4003)


async def test_websockets_are_relayed_to_an_https_upstream(
        make_stack: StackFactory, https_upstream: tuple[str, Path]) -> None:
    """After the 101 the relay takes over the upstream's TLS transport: bytes written to it
    are encrypted, and what it reads is the app's plaintext frames."""
    url, ca_file = https_upstream
    stack = await make_stack(routes=[
        {"name": "tls", "path_prefix": "/", "upstream": url, "auth": "public",
         "upstream_tls": {"ca_file": str(ca_file)}}])
    await relayed_both_ways(stack.gateway + "/ws")


async def test_websockets_are_relayed_to_a_unix_socket_upstream(
        make_stack: StackFactory, unix_upstream: Path) -> None:
    stack = await make_stack(routes=[{"name": "sock", "path_prefix": "/",
                                      "upstream": f"unix:{unix_upstream}", "auth": "public"}])
    await relayed_both_ways(stack.gateway + "/ws")


async def test_on_uvloop_websockets_are_relayed_to_https_and_unix_socket_upstreams(
        tmp_path: Path, https_upstream: tuple[str, Path], unix_upstream: Path) -> None:
    """The same in a real `gateway run` on its default loop, uvloop, whose TLS and Unix
    transports are its own: the relay takes them over as it takes asyncio's."""
    url, ca_file = https_upstream
    gateway = f"http://127.0.0.1:{free_port()}"
    async with idp_and_upstream(gateway) as (idp, upstream):
        config = raw_config(gateway, idp, upstream, routes=[
            {"name": "tls", "path_prefix": "/tls", "upstream": url, "auth": "public",
             "strip_prefix": True, "upstream_tls": {"ca_file": str(ca_file)}},
            {"name": "sock", "path_prefix": "/sock", "upstream": f"unix:{unix_upstream}",
             "auth": "public", "strip_prefix": True}])
        proc = await start_gateway(config, tmp_path / "gateway.yaml",
                                   log=tmp_path / "gateway.log")
        try:
            await wait_until_ready(gateway + "/oauth2/readyz")
            await relayed_both_ways(gateway + "/tls/ws")
            await relayed_both_ways(gateway + "/sock/ws")
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    log = (tmp_path / "gateway.log").read_text()
    assert "event_loop=uvloop" in log
    assert " ERROR " not in log
