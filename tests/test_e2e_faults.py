"""End to end: the store or the IdP goes away, and comes back; nobody gets in who shouldn't."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import BROWSER_HEADERS, FakeClock, Stack, StackFactory, idp_sign_in, login, serve
from redis_servers import Deployment, missing_binaries, start_persistent, start_plain
from yarl import URL

from gateway.app import build_app

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Deployment]:
    """A redis-server for this test alone: it gets paused (SIGSTOP) like a hung store."""
    reason = missing_binaries()
    if reason:
        pytest.skip(reason)
    deployment = start_plain(tmp_path)
    yield deployment
    os.kill(deployment.processes[0].pid, signal.SIGCONT)
    deployment.stop()


async def status_of(browser: aiohttp.ClientSession, url: str, **headers: str) -> int:
    async with browser.get(url, allow_redirects=False, headers=headers or None) as resp:
        await resp.read()
        return resp.status


async def test_hung_store_gives_503_fast_then_recovers_with_every_session(
        make_stack: StackFactory, own_redis: Deployment,
        browser: aiohttp.ClientSession) -> None:
    # (without the session cache, which would answer from memory for up to cache_ttl: nobody
    # can revoke a session while the store does not answer)
    stack = await make_stack(store=own_redis.url,
                             session={"store_timeout": "500ms", "cache_ttl": "0s"})
    await login(browser, stack.gateway, "/echo")
    os.kill(own_redis.processes[0].pid, signal.SIGSTOP)  # Redis stops answering
    try:
        started = time.monotonic()
        assert await status_of(browser, stack.gateway + "/echo") == 503
        assert time.monotonic() - started < 3  # within the store timeout, not a hang
        # A blip must not take every replica out of the balancer: readyz counts the store
        # only when asked to (?full).
        assert await status_of(browser, stack.gateway + "/oauth2/readyz") == 200
        assert await status_of(browser, stack.gateway + "/oauth2/readyz?full") == 503
        assert await status_of(browser, stack.gateway + "/public/echo") == 200
        anonymous = await status_of(browser, stack.gateway + "/echo",
                                    Cookie="gateway_session=" + "a" * 43 + "." + "b" * 43)
        assert anonymous == 503  # never a pass without a session check
    finally:
        os.kill(own_redis.processes[0].pid, signal.SIGCONT)  # and comes back
    assert await status_of(browser, stack.gateway + "/echo") == 200  # the session survived
    assert await status_of(browser, stack.gateway + "/oauth2/readyz?full") == 200


async def test_store_killed_and_restarted_under_load_serves_every_session_again(
        make_stack: StackFactory, tmp_path: Path) -> None:
    """Redis dies with requests in flight: each gets its user's 200 or a 503, never a pass,
    a 401 or a 500; once Redis is back every session made before works again."""
    reason = missing_binaries()
    if reason:
        pytest.skip(reason)
    redis = start_persistent(tmp_path)
    port = URL(redis.url).port
    async with contextlib.AsyncExitStack() as closing:
        stack = await make_stack(store=redis.url, session={"store_timeout": "500ms"})
        users = ["alice", "bob", "alice", "bob", "alice"]
        browsers = [await closing.enter_async_context(aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=BROWSER_HEADERS))
            for _ in users]
        closing.callback(lambda: redis.stop())
        for browser, user in zip(browsers, users, strict=True):
            await login(browser, stack.gateway, "/echo", user=user)
        stop = asyncio.Event()
        seen: list[int] = []

        async def keep_asking(browser: aiohttp.ClientSession, user: str) -> None:
            while not stop.is_set():
                async with browser.get(stack.gateway + "/echo", allow_redirects=False) as resp:
                    assert resp.status in (200, 503), resp.status
                    if resp.status == 200:
                        echoed = dict((await resp.json())["headers"])
                        assert echoed["X-Forwarded-User"] == user
                    seen.append(resp.status)

        workers = [asyncio.create_task(keep_asking(b, u))
                   for b, u in zip(browsers, users, strict=True)]
        await asyncio.sleep(0.3)
        redis.processes[0].kill()  # SIGKILL: no goodbye, connections just break
        redis.processes[0].wait()
        await asyncio.sleep(1.0)
        redis = start_persistent(tmp_path, port)  # same port, same append-only file
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
        assert 503 in seen and seen[-1] == 200  # the outage was seen, and it ended
        for browser in browsers:
            assert await status_of(browser, stack.gateway + "/echo") == 200
        assert await status_of(browsers[0], stack.gateway + "/oauth2/readyz") == 200


async def test_idp_outage_keeps_sessions_and_fails_new_logins_clearly(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    stack: Stack = await make_stack()
    await login(browser, stack.gateway, "/echo")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers=BROWSER_HEADERS) as newcomer:
        async with newcomer.get(stack.gateway + "/echo", allow_redirects=False) as resp:
            authorize = resp.headers["Location"]
        callback = await idp_sign_in(newcomer, authorize, "bob")
        await stack.runners[0].cleanup()  # the IdP goes away mid-login
        assert await status_of(browser, stack.gateway + "/echo") == 200  # no IdP call needed
        async with newcomer.get(callback, allow_redirects=False) as resp:
            assert resp.status == 503
            assert "identity provider" in (await resp.text()).lower()
            assert "gateway_session" not in resp.cookies


async def test_gateway_started_while_the_idp_is_down_recovers_by_itself(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    stack: Stack = await make_stack()
    idp_app = stack.runners[0].app
    await stack.runners[0].cleanup()  # the IdP is down...
    await stack.runners[-1].cleanup()  # ...when a fresh gateway starts
    runner, _ = await serve(build_app(stack.config), URL(stack.gateway).port)
    try:
        assert await status_of(browser, stack.gateway + "/oauth2/readyz") == 503
        idp_runner = web.AppRunner(idp_app, access_log=None)  # the IdP comes back
        await idp_runner.setup()
        await web.TCPSite(idp_runner, "127.0.0.1", URL(stack.idp).port).start()
        try:
            await asyncio.sleep(1.1)  # past the first discovery backoff
            assert await status_of(browser, stack.gateway + "/oauth2/readyz") == 200
            response = await login(browser, stack.gateway, "/echo")
            assert response.status == 200
        finally:
            await idp_runner.cleanup()
    finally:
        await runner.cleanup()


async def test_new_login_while_the_idp_is_down_gets_a_503_page(
        make_stack: StackFactory, clock: FakeClock) -> None:
    stack: Stack = await make_stack(clock=clock)
    await stack.runners[0].cleanup()  # the IdP goes away after the gateway cached discovery
    clock.advance(31)  # the IdP has not been heard from for a while
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/echo", headers=BROWSER_HEADERS,
                            allow_redirects=False) as resp:
            assert resp.status == 503  # not a redirect into a dead IdP
            assert "identity provider cannot be reached" in (await resp.text()).lower()
