"""End to end: WebSockets through the gateway, for as long as the session lives."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import aiohttp
import pytest
from aiohttp import WSMsgType
from conftest import Stack, StackFactory, login

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
