"""End to end: WebSockets through the gateway, for as long as the session lives."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import WSMsgType
from conftest import Stack, StackFactory, login

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
