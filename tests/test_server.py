"""The server around the app: size limits answered before any handler runs (414, 431), the
proxied requests handed straight to the catch-all route, and the garbage collector settled."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_urldispatcher import AbstractRoute
from conftest import Stack, StackFactory, serve
from yarl import URL

from gateway import app as app_module
from gateway import server
from gateway.runtime import Runtime
from gateway.server import (
    CATCH_ALL,
    MAX_REQUEST_LINE,
    GatewayRunner,
    StraightToCatchAll,
    handler_args,
)

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


async def answer_to(base: str, request: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """The status line, the headers that do not change from one answer to the next, and the
    body of the answer to one raw request (with Connection: close)."""
    url = URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()
    while answer.startswith(b"HTTP/1.1 100 "):  # the interim answer to Expect: 100-continue
        answer = answer.partition(b"\r\n\r\n")[2]
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines)
    for varying in (b"Date", b"X-Request-ID", b"Content-Length", b"Set-Cookie"):
        headers.pop(varying, None)
    if b"Location" in headers:  # the sign-in's state, nonce and PKCE challenge are new each time
        headers[b"Location"] = headers[b"Location"].partition(b"?")[0]
    if headers.get(b"Content-Type", b"").startswith(b"application/json") and b'"headers"' in body:
        echoed = json.loads(body)  # what the upstream got, but for the request's own id
        echoed["headers"] = [pair for pair in echoed["headers"]
                             if pair[0].lower() != "x-request-id"]
        body = json.dumps(echoed).encode()
    elif b'"request_id"' in body or b"Request id" in body:
        body = b""  # an error page naming the request's own id
    return status, headers, body


async def test_requests_straight_to_the_catch_all_are_answered_as_through_the_router(
        stack: Stack) -> None:
    """GatewayRunner hands a request that aiohttp's router could only send to the catch-all
    route straight to it: every request is answered exactly as the same app answers it
    through the router and aiohttp's middleware chain, endpoints and refusals alike."""
    app = app_module.build_app(stack.config)
    del app[CATCH_ALL]  # every request through the router, on the same runner
    twin, twin_url = await serve(app, runner_class=GatewayRunner)
    try:
        requests = [
            get("/public/echo"), get("/public/echo?q=%20x"),
            get("/echo", "Accept: application/json"), get("/echo", "Accept: text/html"),
            get("/oauth2/healthz"), get("/%6Fauth2/healthz"), get("/oauth2%2Fhealthz"),
            get("/oauth2/nothing-here"), get("/oauth2"), get("/oauth2/healthz/"),
            get("//oauth2/healthz"), get("/public/../oauth2/healthz"),
            get("http://x/public/echo"), get("*"),
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"POST /oauth2/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: 0\r\n\r\n",
            b"POST /public/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
            b"POST /public/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Expect: something-else\r\nContent-Length: 2\r\n\r\nhi",
        ]
        for request in requests:
            straight = await answer_to(stack.gateway, request)
            assert straight == await answer_to(twin_url, request), request
            assert straight[1][b"Server"] == b"gateway"  # the app's signal ran both ways
    finally:
        await twin.cleanup()


def recording_app(*paths: str) -> tuple[web.Application, list[str], AbstractRoute]:
    seen: list[str] = []

    def middleware(name: str) -> Middleware:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            seen.append(name)
            return await handler(request)
        return record

    async def endpoint(request: web.Request) -> web.Response:
        seen.append("endpoint")
        return web.Response()

    async def catch_all(request: web.Request) -> web.Response:
        seen.append(f"catch-all app={request.app is app} route={request.match_info.route is route}")
        return web.Response()

    app = web.Application(middlewares=[middleware("outer"), middleware("inner")])
    for path in paths:
        app.router.add_get(path, endpoint)
    route = app.router.add_route("*", "/{tail:.*}", catch_all)
    return app, seen, route


@pytest.mark.parametrize(("path", "straight"), [
    ("/", True), ("/app/page", True), ("/oauth", True), ("/oauth2x/y", True),
    ("/oauth2/start", False), ("/oauth2", False), ("/oauth2/other", False),
    ("/%6Fauth2/start", False), ("*", False)])
async def test_only_a_path_the_router_could_send_nowhere_else_goes_straight(
        path: str, straight: bool) -> None:
    app, seen, route = recording_app("/oauth2/start", "/oauth2/auth/{tail:.*}")
    through_app: list[str] = []

    async def router(request: web.BaseRequest) -> web.StreamResponse:
        through_app.append(request.path)
        return web.Response()

    handler = StraightToCatchAll(app, route, router)
    await handler(make_mocked_request("GET", path, app=app))
    if straight:
        assert (seen, through_app) == (["outer", "inner", "catch-all app=True route=True"], [])
    else:
        assert (seen, len(through_app)) == ([], 1)
    seen.clear()
    await handler(make_mocked_request("POST", path, headers={"Expect": "100-continue"}, app=app))
    assert seen == []  # aiohttp's expect handler is the router's


@pytest.mark.parametrize("path", ["/", "/{name}", "/{name}/more"])
def test_no_straight_path_when_another_route_could_take_any_path(path: str) -> None:
    app, _, route = recording_app(path)

    async def router(request: web.BaseRequest) -> web.StreamResponse:
        raise AssertionError("not called")

    with pytest.raises(RuntimeError, match="not the only route"):
        StraightToCatchAll(app, route, router)


def test_settled_objects_are_left_alone_until_settled_again_after_a_reload() -> None:
    """What a process made to start is out of the collector's sight (its full collections
    walked all of it); a reload settles it again, so a replaced config's cycles go."""

    class Config:
        me: object

    old = Config()
    old.me = old  # a reference cycle: only the collector frees it
    gone = weakref.ref(old)
    try:
        server.settle_gc()
        assert gc.get_freeze_count() > 0
        del old
        gc.collect()
        assert gone() is not None  # settled: no collection walks it
        server.settle_again()
        assert gone() is None
        assert gc.get_freeze_count() > 0  # what is still alive is settled again
    finally:
        gc.unfreeze()


async def test_a_reload_settles_the_collector_again_once_the_old_configs_requests_are_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = iter([False, True])
    settled = asyncio.Event()
    monkeypatch.setattr(server.reload, "reload", lambda rt, path: next(outcomes))
    monkeypatch.setattr(server, "settle_again", settled.set)
    monkeypatch.setattr(server, "SETTLE_AFTER_RELOAD", 0.05)
    rt = cast(Runtime, object())
    server._reload(rt, "refused.yaml")  # a refused config replaced nothing
    await asyncio.sleep(0.2)
    assert not settled.is_set()
    server._reload(rt, "gateway.yaml")
    assert not settled.is_set()  # not at once: the old config's requests may be in flight
    await asyncio.wait_for(settled.wait(), timeout=2)
