"""End to end: upstreams over HTTPS with a private CA, and on a Unix socket."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import StackFactory, free_port
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


async def test_unix_socket_upstream(make_stack: StackFactory, tmp_path: Path) -> None:
    socket_path = tmp_path / "app.sock"
    runner = web.AppRunner(create_upstream_app(), access_log=None)
    await runner.setup()
    await web.UnixSite(runner, str(socket_path)).start()
    try:
        stack = await make_stack(routes=[{"name": "sock", "path_prefix": "/",
                                          "upstream": f"unix:{socket_path}", "auth": "public"}])
        async with aiohttp.ClientSession() as http:
            async with http.get(stack.gateway + "/echo?via=socket") as resp:
                assert resp.status == 200
                assert (await resp.json())["query"] == "via=socket"
    finally:
        await runner.cleanup()
