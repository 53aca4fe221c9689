"""The server around the app: size limits answered before any handler runs (414, 431)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Stack, StackFactory
from yarl import URL

from gateway import app as app_module
from gateway.server import MAX_REQUEST_LINE, handler_args

pytestmark = pytest.mark.e2e


async def exchange(stack: Stack, request: bytes) -> tuple[int, bytes]:
    url = URL(stack.gateway)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(answer.split(b" ", 2)[1]), answer


def get(target: str = "/public/echo", *headers: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: x", "Connection: close", *headers, "", ""]
    return "\r\n".join(lines).encode()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack(server={"max_header_size": "4KiB"})


async def test_header_line_up_to_the_limit_is_proxied(stack: Stack) -> None:
    status, answer = await exchange(stack, get("/public/echo", "X-Big: " + "a" * 4000))
    assert status == 200 and b"a" * 4000 in answer


async def test_header_line_over_the_limit_gets_431(stack: Stack) -> None:
    status, answer = await exchange(stack, get("/public/echo", "Cookie: big=" + "a" * 5000))
    assert status == 431
    assert b"<h1>431 Request headers too large" in answer and b"aaaa" not in answer


async def test_too_many_header_lines_get_431(stack: Stack) -> None:
    status, _ = await exchange(stack, get("/public/echo",
                                          *(f"X-H{i}: {i}" for i in range(200))))
    assert status == 431


async def test_overlong_request_line_gets_414(stack: Stack) -> None:
    status, answer = await exchange(stack, get("/public/echo?q=" + "a" * MAX_REQUEST_LINE))
    assert status == 414 and b"414 Address too long" in answer


async def test_overlong_path_within_the_request_line_gets_414(stack: Stack) -> None:
    status, _ = await exchange(stack, get("/public/" + "a" * 9000))
    assert status == 414


async def test_other_parse_errors_stay_400(stack: Stack) -> None:
    status, _ = await exchange(stack, get("/public/echo", "Bad Name: x"))
    assert status == 400


async def test_431_page_tells_the_person_what_to_do(stack: Stack) -> None:
    status, answer = await exchange(stack, get("/public/echo", "Accept: application/json",
                                               "Cookie: big=" + "a" * 5000))
    assert status == 431 and b"Clearing this site" in answer and b"no-store" in answer


def test_line_limits_differ_even_when_configured_equal() -> None:
    args = handler_args(MAX_REQUEST_LINE)
    assert args["max_line_size"] != args["max_field_size"]
    assert handler_args(8192)["max_line_size"] == MAX_REQUEST_LINE


async def test_a_listener_that_loses_a_cancellation_is_cancelled_again() -> None:
    """Seen with redis-py connecting on uvloop: the invalidation listener swallowed the
    cancel at shutdown, and the worker never finished stopping."""
    swallowed = 0

    async def listener() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()

    task = asyncio.create_task(listener())
    await asyncio.sleep(0)
    await asyncio.wait_for(app_module._stop_listening(task), timeout=5)
    assert task.cancelled() and swallowed == 1
