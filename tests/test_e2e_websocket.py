"""End to end: WebSockets through the gateway, for as long as the session lives."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import aiohttp
import pytest
from aiohttp import WSMsgType
from conftest import Stack, StackFactory, login
from ports import free_port

from gateway.runtime import RUNTIME

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


async def test_frames_and_close_codes_pass_both_ways(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    await login(browser, stack.gateway, "/echo")
    async with browser.ws_connect(stack.gateway + "/ws", autoping=False) as ws:
        await ws.send_str("hi")
        assert (await ws.receive()).data == "echo:hi"
        await ws.send_bytes(b"\xff\x00")
        assert (await ws.receive()).data == b"\xff\x00"
        await ws.ping(b"p")
        pong = await ws.receive()
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"p")
        await ws.send_str("close:4002")  # the upstream closes with its own code
        message = await ws.receive()
        assert (message.type, message.data) == (WSMsgType.CLOSE, 4002)


async def test_a_revoked_session_closes_its_open_websockets(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    await login(browser, stack.gateway, "/echo")
    async with browser.ws_connect(stack.gateway + "/ws") as ws:
        await ws.send_str("before")
        assert (await ws.receive()).data == "echo:before"
        async with browser.post(stack.gateway + "/oauth2/sign_out", allow_redirects=False,
                                headers={"Origin": stack.gateway}) as resp:
            assert resp.status == 302  # e.g. signed out in another tab
        message = await asyncio.wait_for(ws.receive(), timeout=5)
        assert message.type == WSMsgType.CLOSE
        assert message.data == 1008  # policy violation: the session ended


async def test_shutdown_closes_websockets_with_going_away(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    await login(browser, stack.gateway, "/echo")
    async with browser.ws_connect(stack.gateway + "/ws") as ws:
        await ws.send_str("x")
        await ws.receive()
        shutdown = asyncio.create_task(stack.runners[-1].cleanup())
        message = await asyncio.wait_for(ws.receive(), timeout=5)
        assert message.type == WSMsgType.CLOSE
        assert message.data == 1001
        await asyncio.wait_for(shutdown, timeout=10)


async def closed_with(ws: aiohttp.ClientWebSocketResponse, within: float) -> int | None:
    """The close code the gateway sent (pings answered meanwhile), or None if it stayed open."""
    try:
        async with asyncio.timeout(within):
            while True:
                message = await ws.receive()
                if message.type == WSMsgType.CLOSE:
                    return int(message.data)
                if message.type in (WSMsgType.CLOSED, WSMsgType.ERROR):
                    return -1
    except TimeoutError:
        return None


async def test_an_idle_websocket_does_not_keep_its_session_alive(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    """Seen: 20 idle sockets kept their session alive until max_lifetime; the watcher's
    reload touched it every 2 s. Now the session times out and its sockets close with 1008."""
    stack = await make_stack(session={"idle_timeout": "3s"})
    await login(browser, stack.gateway, "/echo")
    async with browser.ws_connect(stack.gateway + "/ws") as ws:
        assert await closed_with(ws, within=8) == 1008
    async with browser.get(stack.gateway + "/echo", allow_redirects=False,
                           headers={"Accept": "application/json"}) as resp:
        assert resp.status == 401  # the session timed out


async def test_websocket_idle_timeout_closes_a_silent_socket_and_spares_a_busy_one(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    stack = await make_stack(routes=[
        {"name": "app", "path_prefix": "/", "auth": "public", "websocket_idle_timeout": "2s"}])
    async with browser.ws_connect(stack.gateway + "/ws") as silent, \
            browser.ws_connect(stack.gateway + "/ws") as busy:
        for _ in range(10):  # 5 s of a frame every half second
            await busy.send_str("x")
            assert (await busy.receive()).data == "echo:x"
            await asyncio.sleep(0.5)
        assert await closed_with(silent, within=0.1) == 1001
        assert await closed_with(busy, within=0.1) is None


async def test_a_half_open_client_is_found_by_pings(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    """A client that stopped answering (it never reads) is closed, not held for hours."""
    stack = await make_stack(routes=[
        {"name": "app", "path_prefix": "/", "auth": "public", "websocket_ping_interval": "1s"}])
    async with browser.ws_connect(stack.gateway + "/ws", autoping=False) as deaf, \
            browser.ws_connect(stack.gateway + "/ws") as alive:
        listening = asyncio.create_task(closed_with(alive, within=3))  # answers every ping
        await asyncio.sleep(3)  # the deaf one answers none meanwhile
        assert await listening is None
        message = await deaf.receive()
        while message.type == WSMsgType.PING:
            message = await deaf.receive()
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
        await alive.send_str("still here")
        assert (await alive.receive()).data == "echo:still here"


async def test_one_store_round_trip_per_interval_watches_every_socket(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    """A task per socket polling Redis every 2 s did not scale: now one check, for all."""
    stack = await make_stack()
    await login(browser, stack.gateway, "/echo")
    runtime = stack.runners[-1].app[RUNTIME]
    checks: list[int] = []
    alive = runtime.sessions.alive

    async def counted(ids: Collection[str]) -> set[str]:
        checks.append(len(ids))
        return await alive(ids)

    runtime.sockets._alive = counted
    sockets = [await browser.ws_connect(stack.gateway + "/ws") for _ in range(30)]
    try:
        await asyncio.sleep(4.5)
        assert 1 <= len(checks) <= 3 and set(checks) == {1}  # one session, one question
        assert len(runtime.sockets) == 30
    finally:
        for ws in sockets:
            await ws.close()


async def test_a_message_of_any_size_passes_as_it_came(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """Bytes are relayed, not messages rebuilt: aiohttp's 4 MiB message limit is gone, and
    permessage-deflate is agreed between the browser and the app, not with the gateway."""
    await login(browser, stack.gateway, "/echo")
    async with browser.ws_connect(stack.gateway + "/ws", max_msg_size=0, compress=15) as ws:
        assert ws.compress == 15  # the upstream (aiohttp) accepted the browser's offer
        big = bytes(range(256)) * (6 * 4096)  # 6 MiB
        await ws.send_bytes(big)
        assert (await ws.receive(timeout=10)).data == big
        await ws.send_str("small")
        assert (await ws.receive()).data == "echo:small"


async def test_an_upstream_that_refuses_the_upgrade_is_answered_as_it_answered(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    await login(browser, stack.gateway, "/echo")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await browser.ws_connect(stack.gateway + "/status/403")
    assert refused.value.status == 403


async def test_a_bad_opening_handshake_is_refused_before_the_upstream(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    await login(browser, stack.gateway, "/echo")
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
    for extra in ({"Sec-WebSocket-Version": "13"},  # no key
                  {"Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "c2hvcnQ="},
                  {"Sec-WebSocket-Version": "8", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}):
        async with browser.get(stack.gateway + "/ws", headers={**upgrade, **extra}) as resp:
            assert resp.status == 400
            assert resp.headers["Sec-WebSocket-Version"] == "13"  # RFC 6455 §4.4
            assert "Sec-WebSocket-Key" in await resp.text()


async def test_an_upgrade_with_a_body_or_without_the_upgrade_token_is_no_websocket(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """A body would reach the upstream ahead of the frames, never scanned: refused. And
    "Connection: foo-upgrade" is no upgrade to aiohttp's parser, so none to the gateway
    either: the request goes on as a plain one (the upstream's /ws then refuses it)."""
    await login(browser, stack.gateway, "/echo")
    handshake = {"Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    async with browser.get(stack.gateway + "/ws", headers=handshake, data=b"\x81\x02hi") as resp:
        assert resp.status == 400
        assert resp.headers["Sec-WebSocket-Version"] == "13"  # the handshake's own refusal
    async with browser.get(stack.gateway + "/ws",
                           headers={**handshake, "Connection": "foo-upgrade"}) as resp:
        assert resp.status != 101
        assert resp.headers.get("Upgrade") is None


async def _canned_upstream(answer: bytes) -> tuple[asyncio.Server, str]:
    """An upstream that answers every request with `answer`, then keeps the line open."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await reader.read()  # until the gateway hangs up
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    return server, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("upgrade", [True, False])
async def test_a_101_that_is_not_this_websocket_is_never_tunnelled(
        make_stack: StackFactory, upgrade: bool) -> None:
    """An upstream's 101 with the wrong accept value, or a 101 to a request that asked for no
    upgrade, would make the gateway pass raw bytes it never checked: a 502 instead."""
    server, upstream = await _canned_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
    try:
        stack = await make_stack(routes=[{"name": "app", "path_prefix": "/", "auth": "public",
                                          "upstream": upstream}])
        async with aiohttp.ClientSession() as http:
            if upgrade:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(stack.gateway + "/ws")
                assert refused.value.status == 502
            else:
                async with http.get(stack.gateway + "/page") as resp:
                    assert resp.status == 502
    finally:
        server.close()


async def test_aiohttp_keeps_nothing_of_a_relayed_socket(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """After the handshake both connections are the relay's: the server's connection list
    (and the request, its handler task) no longer hold them; the watch does, until they end."""
    await login(browser, stack.gateway, "/echo")
    runner = stack.runners[-1]
    runtime = runner.app[RUNTIME]
    before = len(runner.server.connections) if runner.server else 0
    sockets = [await browser.ws_connect(stack.gateway + "/ws") for _ in range(20)]
    for ws in sockets:
        await ws.send_str("x")
        assert (await ws.receive()).data == "echo:x"
    assert runner.server is not None
    assert len(runner.server.connections) <= before + 1  # the browser's plain connection
    assert len(runtime.sockets) == 20
    for ws in sockets:
        await ws.close()
    for _ in range(50):
        if not len(runtime.sockets):
            break
        await asyncio.sleep(0.1)
    assert len(runtime.sockets) == 0


async def test_a_socket_outlives_the_routes_request_timeouts(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    """read_timeout and total_timeout bound the handshake, as any request; not the socket."""
    stack = await make_stack(routes=[
        {"name": "app", "path_prefix": "/", "auth": "public", "read_timeout": "1s",
         "total_timeout": "1s", "websocket_ping_interval": "0s"}])
    async with browser.ws_connect(stack.gateway + "/ws", autoping=False) as ws:
        await asyncio.sleep(2.5)
        await ws.send_str("later")
        assert (await ws.receive(timeout=5)).data == "echo:later"
