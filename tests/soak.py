"""A fixed mix of traffic for soak runs: logins and sign-outs, signed-in and anonymous requests,
WebSockets (some cut without a close frame) and downloads the client leaves mid-stream.

Used by tests/test_soak.py (bounded, in CI) and bench/soak.py (long, by hand, with sampling).
Every worker runs until the deadline; the result counts what was done, so a run can check it
did what it meant to.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections import Counter

import aiohttp
from conftest import BROWSER_HEADERS, login

_OUTCOMES = (200, 302, 401)


def _browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 headers=BROWSER_HEADERS)


async def _logins(gateway: str, until: float, done: Counter[str]) -> None:
    """Sign in, use the session a little, sign out (POST from our origin); again."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        async with _browser() as browser:
            await login(browser, gateway, "/echo", user=random.choice(("alice", "bob")))  # noqa: S311
            for _ in range(3):
                async with browser.get(gateway + "/echo") as resp:
                    assert resp.status == 200, resp.status
            async with browser.post(gateway + "/oauth2/sign_out", allow_redirects=False,
                                    headers={"Origin": gateway}) as resp:
                assert resp.status == 302
        done["logins"] += 1


async def _requests(gateway: str, until: float, done: Counter[str]) -> None:
    """One signed-in user and one anonymous API client, asking all the time."""
    loop = asyncio.get_running_loop()
    async with _browser() as browser, aiohttp.ClientSession() as anonymous:
        await login(browser, gateway, "/echo")
        while loop.time() < until:
            async with browser.get(gateway + "/echo") as resp:
                assert resp.status == 200, resp.status
            async with anonymous.get(gateway + "/echo",
                                     headers={"Accept": "application/json"}) as resp:
                assert resp.status in _OUTCOMES, resp.status
            done["requests"] += 2
        async with browser.post(gateway + "/oauth2/sign_out", allow_redirects=False,
                                headers={"Origin": gateway}) as resp:
            assert resp.status == 302


async def _websockets(gateway: str, until: float, done: Counter[str]) -> None:
    """Open a socket, talk, then close it properly or just cut the connection."""
    loop = asyncio.get_running_loop()
    async with _browser() as browser:
        await login(browser, gateway, "/echo")
        while loop.time() < until:
            ws = await browser.ws_connect(gateway + "/ws")
            await ws.send_str("x")
            assert (await ws.receive()).data == "echo:x"
            if done["websockets"] % 2:
                await ws.close()
            else:  # no close frame: the client vanished
                transport = ws._response.connection.transport  # type: ignore[union-attr]
                assert transport is not None
                transport.abort()
                await ws.close()
            done["websockets"] += 1
        async with browser.post(gateway + "/oauth2/sign_out", allow_redirects=False,
                                headers={"Origin": gateway}) as resp:
            assert resp.status == 302


async def _downloads_left(gateway: str, until: float, done: Counter[str]) -> None:
    """Start a big public download and leave after the first bytes (FIN or RST)."""
    loop = asyncio.get_running_loop()
    host, port = gateway.removeprefix("http://").rsplit(":", 1)
    while loop.time() < until:
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if done["downloads_left"] % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.closing(sock):
            await loop.sock_connect(sock, (host, int(port)))
            await loop.sock_sendall(sock, b"GET /public/download?bytes=50000000 HTTP/1.1\r\n"
                                          b"Host: soak\r\nConnection: close\r\n\r\n")
            await loop.sock_recv(sock, 1024)
            await asyncio.sleep(0.05)
        done["downloads_left"] += 1
        await asyncio.sleep(0.1)


async def soak(gateway: str, seconds: float, *, scale: int = 1) -> Counter[str]:
    """Run the mix against `gateway` for `seconds`; `scale` multiplies the workers."""
    until = asyncio.get_running_loop().time() + seconds
    done: Counter[str] = Counter()
    workers = [_logins] * 2 + [_requests] * 2 + [_websockets] + [_downloads_left]
    await asyncio.gather(*(worker(gateway, until, done) for worker in workers * scale))
    return done
