"""Request smuggling basics: ambiguous framing is refused by the server before any proxying.

aiohttp's HTTP parser (the C one, or the Python one where C is unavailable) does the refusing;
these tests pin that down through a raw socket, and check the upstream never saw a request.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import Stack, StackFactory
from yarl import URL

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


async def raw_exchange(stack: Stack, request: bytes) -> bytes:
    url = URL(stack.gateway)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("request_bytes", [
    # Content-Length and Transfer-Encoding together (CL.TE / TE.CL desync)
    b"POST /public/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
    # two different Content-Length values
    b"POST /public/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n"
    b"abcd",
    # obsolete line folding (obs-fold)
    b"GET /public/echo HTTP/1.1\r\nHost: x\r\nX-Forwarded-User: a\r\n admin\r\n\r\n",
    # an invalid header name
    b"GET /public/echo HTTP/1.1\r\nHost: x\r\nX Forwarded User: admin\r\n\r\n",
    # a Transfer-Encoding that is not exactly chunked
    b"POST /public/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
], ids=["cl-and-te", "two-content-lengths", "obs-fold", "bad-header-name", "odd-te"])
async def test_ambiguous_requests_are_refused_before_proxying(
        stack: Stack, request_bytes: bytes) -> None:
    answer = await raw_exchange(stack, request_bytes)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split(b" ")[1] == b"400", answer[:200]
    assert b'"method"' not in answer  # the upstream's echo never ran


async def test_expect_100_continue_is_answered_only_after_the_session_check(
        stack: Stack) -> None:
    """A client without a session is refused before it sends its body."""
    head = (b"POST /echo HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n"
            b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
    answer = await raw_exchange(stack, head)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    public = (b"POST /public/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
              b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    url = URL(stack.gateway)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(public)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(b"hello")
        final = await asyncio.wait_for(reader.read(65536), timeout=5)
        assert final.startswith(b"HTTP/1.1 200") and b'"body_length": 5' in final
        assert b"expect" not in final.lower().split(b"\r\n\r\n", 1)[1]  # not sent upstream
    finally:
        writer.close()
        await writer.wait_closed()


async def test_oversized_headers_are_refused_and_their_bytes_never_logged(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp would log the start of an oversized Cookie header: a session cookie leak."""
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-cookie-value"
    head = (b"GET /public/echo HTTP/1.1\r\nHost: x\r\nCookie: gateway_session="
            + secret.encode() + b"x" * 20000 + b"\r\nConnection: close\r\n\r\n")
    answer = await raw_exchange(stack, head)
    assert answer.split(b" ")[1] == b"431"
    assert "headers_too_large status=431" in caplog.text
    assert secret not in caplog.text and secret.encode() not in answer
    assert "Traceback" not in caplog.text
