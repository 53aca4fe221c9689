"""End to end: token refresh, once per session across replicas, and what its failures do."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from conftest import BROWSER_HEADERS, FakeClock, Stack, StackFactory, login, serve

from gateway.app import build_app
from gateway.config import SessionConfig
from gateway.demo.idp import STATE
from gateway.oidc.token_set import TokenSet
from gateway.refresh import refresh_at
from gateway.runtime import RUNTIME
from gateway.sessions.cookies import SessionCookie

pytestmark = pytest.mark.e2e

TTL = 120  # the IdP's access token lifetime; the default refresh margin is 60 s


class TokenEndpointSwitch:
    """Makes the IdP's token endpoint fail on demand (the IdP 'is down' for refreshes)."""

    def __init__(self) -> None:
        self.failing = False
        self.delay = 0.0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/token":
            await asyncio.sleep(self.delay)
            if self.failing:
                return web.json_response({"error": "temporarily_unavailable"}, status=503)
        return await handler(request)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    return "memory://" if request.param == "memory" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
def switch() -> TokenEndpointSwitch:
    return TokenEndpointSwitch()


@pytest.fixture
async def stack(make_stack: StackFactory, store: str, clock: FakeClock,
                switch: TokenEndpointSwitch) -> Stack:
    return await make_stack(store=store, clock=clock, access_token_ttl=TTL,
                            idp_middlewares=[switch.middleware])


def token_requests(stack: Stack) -> int:
    return stack.idp_app[STATE].token_requests


async def status_of(browser: aiohttp.ClientSession, url: str) -> int:
    async with browser.get(url, allow_redirects=False) as resp:
        return resp.status


async def test_due_token_is_refreshed_and_the_session_goes_on(
        stack: Stack, browser: aiohttp.ClientSession, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    await login(browser, stack.gateway, "/echo")
    before = token_requests(stack)
    assert await status_of(browser, stack.gateway + "/echo") == 200
    assert token_requests(stack) == before  # not due yet
    clock.advance(TTL - 30)  # inside the 60 s margin
    assert await status_of(browser, stack.gateway + "/echo") == 200
    assert token_requests(stack) == before + 1
    assert "session_refreshed sub=alice" in caplog.text
    clock.advance(TTL - 30)  # the refreshed token is due in turn: rotation keeps working
    assert await status_of(browser, stack.gateway + "/echo") == 200
    assert token_requests(stack) == before + 2


@pytest.fixture
async def replicas(stack: Stack, clock: FakeClock) -> AsyncIterator[list[str]]:
    """Two more gateways on the same store and config, as behind a load balancer."""
    runners = [(await serve(build_app(stack.config, clock=clock)))[0] for _ in range(2)]
    urls = [stack.gateway] + [
        f"http://127.0.0.1:{runner.addresses[0][1]}" for runner in runners]
    yield urls
    for runner in runners:
        await runner.cleanup()


REDIS_ONLY = pytest.mark.parametrize("store", ["redis"], indirect=True)  # replicas share Redis


@REDIS_ONLY
async def test_concurrent_requests_across_replicas_refresh_exactly_once(
        stack: Stack, replicas: list[str], browser: aiohttp.ClientSession,
        clock: FakeClock, switch: TokenEndpointSwitch) -> None:
    await login(browser, stack.gateway, "/echo")
    before = token_requests(stack)
    switch.delay = 0.5  # a slow IdP: every request arrives while the refresh is under way
    clock.advance(TTL + 5)  # expired: nobody may use the old token
    urls = [replicas[i % 3] + f"/echo/{i}" for i in range(20)]
    statuses = await asyncio.gather(*(status_of(browser, url) for url in urls))
    assert statuses == [200] * 20
    assert token_requests(stack) == before + 1


async def test_invalid_grant_ends_the_session(stack: Stack, browser: aiohttp.ClientSession,
                                              clock: FakeClock) -> None:
    await login(browser, stack.gateway, "/echo")
    stack.idp_app[STATE].refresh_tokens.clear()  # the IdP revoked the grant
    clock.advance(TTL - 30)
    async with browser.get(stack.gateway + "/echo", allow_redirects=False,
                           headers={"Accept": "application/json"}) as resp:
        assert resp.status == 401
    async with browser.get(stack.gateway + "/echo", allow_redirects=False,
                           headers=BROWSER_HEADERS) as resp:
        assert resp.status == 302  # back through the login, to the same URL
        assert resp.headers["Location"].startswith(stack.idp + "/authorize")


async def test_idp_down_during_refresh_keeps_the_session(
        stack: Stack, browser: aiohttp.ClientSession, clock: FakeClock,
        switch: TokenEndpointSwitch) -> None:
    await login(browser, stack.gateway, "/echo")
    switch.failing = True
    clock.advance(TTL - 30)  # due, but the access token is still valid: carry on
    assert await status_of(browser, stack.gateway + "/echo") == 200
    clock.advance(60)  # expired, and refresh_grace is 0: never forwarded
    async with browser.get(stack.gateway + "/echo") as resp:
        assert resp.status == 503
        assert "Traceback" not in await resp.text()
    switch.failing = False  # the IdP is back
    # this session was just tried: not again before refresh_min_interval (no IdP hammering)
    assert await status_of(browser, stack.gateway + "/echo") == 503
    clock.advance(10)  # then the same session refreshes and goes on
    assert await status_of(browser, stack.gateway + "/echo") == 200


@REDIS_ONLY
async def test_sign_out_on_one_replica_is_refused_on_the_others_at_once(
        stack: Stack, replicas: list[str], browser: aiohttp.ClientSession) -> None:
    """Revocation: no replica caches sessions, so a deletion anywhere is seen everywhere."""
    await login(browser, replicas[0], "/echo")
    for url in replicas:
        assert await status_of(browser, url + "/echo") == 200
    copied = next(c.value for c in browser.cookie_jar if c.key == "gateway_session")
    async with browser.post(replicas[2] + "/oauth2/sign_out", allow_redirects=False,
                            headers={"Origin": stack.gateway}) as resp:
        assert resp.status == 302
    async with aiohttp.ClientSession() as other:  # the cookie, replayed on replicas A and B
        for url in replicas[:2]:
            async with other.get(url + "/echo", cookies={"gateway_session": copied},
                                 headers={"Accept": "application/json"}) as resp:
                assert resp.status == 401


async def test_a_lock_left_by_a_dead_replica_does_not_wedge_the_session(
        stack: Stack, browser: aiohttp.ClientSession, clock: FakeClock) -> None:
    """A replica that took the refresh lock and died: the lock expires and others go on."""
    await login(browser, stack.gateway, "/echo")
    cookie = next(c.value for c in browser.cookie_jar if c.key == "gateway_session")
    store = stack.runners[-1].app[RUNTIME].sessions
    loaded = await store.load(cookie)
    assert loaded is not None
    assert await store.take_refresh_lock(loaded, b"a replica that died", 0.3)
    before = token_requests(stack)
    clock.advance(TTL + 5)  # expired: the request must refresh, not use the old token
    assert await status_of(browser, stack.gateway + "/echo") == 200
    assert token_requests(stack) == before + 1


def set_groups(stack: Stack, user: str, *groups: str) -> None:
    """The IdP's admin changes a user's groups."""
    state = stack.idp_app[STATE]
    state.users = {**state.users, user: dataclasses.replace(state.users[user], groups=groups)}


async def groups_seen_upstream(browser: aiohttp.ClientSession, stack: Stack) -> str | None:
    async with browser.get(stack.gateway + "/echo", allow_redirects=False) as resp:
        assert resp.status == 200
        sent = dict((await resp.json())["headers"])
        return sent.get("X-Forwarded-Groups")


async def test_a_user_removed_from_a_group_at_the_idp_loses_its_routes_at_the_next_refresh(
        stack: Stack, browser: aiohttp.ClientSession, clock: FakeClock) -> None:
    await login(browser, stack.gateway, "/admin/x")
    set_groups(stack, "alice", "staff")
    assert await status_of(browser, stack.gateway + "/admin/x") == 200  # not refreshed yet
    clock.advance(TTL - 30)  # due: the refreshed ID token carries the new groups
    assert await status_of(browser, stack.gateway + "/admin/x") == 403
    assert await groups_seen_upstream(browser, stack) == "staff"
    set_groups(stack, "alice", "admins", "staff")  # and back again, at the next refresh
    clock.advance(TTL - 30)
    assert await status_of(browser, stack.gateway + "/admin/x") == 200


class WithoutRefreshedIdToken:
    """An IdP that answers refreshes without an ID token (allowed by RFC 6749 §6)."""

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        form = await request.post() if request.path == "/token" else {}
        if form.get("grant_type") == "refresh_token" and isinstance(response, web.Response):
            assert response.text is not None
            body = json.loads(response.text)
            body.pop("id_token")
            return web.json_response(body, headers={"Cache-Control": "no-store"})
        return response


@pytest.mark.parametrize("refresh_userinfo", [True, False])
async def test_without_a_refreshed_id_token_userinfo_updates_the_identity_when_configured(
        make_stack: StackFactory, store: str, clock: FakeClock, browser: aiohttp.ClientSession,
        refresh_userinfo: bool) -> None:
    stack = await make_stack(store=store, clock=clock, access_token_ttl=TTL,
                             idp_middlewares=[WithoutRefreshedIdToken().middleware],
                             oidc={"refresh_userinfo": refresh_userinfo})
    await login(browser, stack.gateway, "/echo")
    set_groups(stack, "alice", "staff")
    clock.advance(TTL - 30)
    expected = "staff" if refresh_userinfo else "admins,staff"
    assert await groups_seen_upstream(browser, stack) == expected
    # The claims policies read: userinfo's renewed, the ID token's from the login kept.
    loaded = await stack.runners[-1].app[RUNTIME].sessions.load(
        next(c.value for c in browser.cookie_jar if c.key == "gateway_session"))
    assert loaded is not None and loaded.session.identity.claims is not None
    claims = loaded.session.identity.claims
    assert claims["groups"] == (["staff"] if refresh_userinfo else ["admins", "staff"])
    assert claims["iss"] == stack.idp  # only in the ID token


async def test_a_session_revoked_during_its_refresh_stays_revoked(
        stack: Stack, browser: aiohttp.ClientSession, clock: FakeClock,
        switch: TokenEndpointSwitch) -> None:
    """The race: a refresh's write used to be an unconditional SET, so a revocation that
    landed while the token request was in flight was undone, and the session came back
    without a registry entry (so no revocation could ever find it again)."""
    await login(browser, stack.gateway, "/echo")
    registry = stack.runners[-1].app[RUNTIME].sessions.registry
    cookie = SessionCookie.parse(next(c.value for c in browser.cookie_jar
                                      if c.key == "gateway_session"))
    assert cookie is not None
    info = await registry.get(cookie.storage_id)
    assert info is not None
    switch.delay = 1.0  # the token request is slow
    clock.advance(TTL - 30)
    refreshing = asyncio.create_task(status_of(browser, stack.gateway + "/echo"))
    await asyncio.sleep(0.5)  # the refresh is waiting for the IdP now
    assert await registry.revoke([info]) == 1  # as `gateway sessions revoke --user alice`
    assert await refreshing == 302  # the request that refreshed finds the session gone
    assert await status_of(browser, stack.gateway + "/echo") == 302
    assert await registry.get(cookie.storage_id) is None
    for found in (await registry.by_sub("alice"), await registry.by_user("alice@example.com")):
        assert cookie.storage_id not in {i.storage_id for i in found}


def timing(margin: float = 60, grace: float = 0, floor: float = 10) -> SessionConfig:
    return SessionConfig(refresh_margin=f"{margin}s", refresh_grace=f"{grace}s",
                         refresh_min_interval=f"{floor}s")


@pytest.mark.parametrize(("lifetime", "config", "due_after"), [
    (3600, timing(), 3540),  # long-lived: the margin before expiry
    (60, timing(), 30),  # as long as the margin: half way, never at issue time
    (61, timing(), 30.5),  # just above it: half way too, not every second
    (5, timing(grace=10), 10),  # shorter than the floor: the floor, used under grace
    (5, timing(), 5),  # ...but never past expiry plus grace
    (120, timing(margin=0), 120),
])
def test_a_refresh_is_due_inside_the_tokens_life_never_at_its_start(
        lifetime: float, config: SessionConfig, due_after: float) -> None:
    issued = 1_000_000.0
    token_set = TokenSet("a", "i", "r", expires_at=issued + lifetime, issued_at=issued)
    assert refresh_at(token_set, config) == issued + due_after
    assert refresh_at(dataclasses.replace(token_set, refresh_token=None), config) is None


async def test_short_tokens_refresh_at_most_once_per_floor_and_the_session_keeps_working(
        make_stack: StackFactory, clock: FakeClock, browser: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    """5-second tokens, a 10-second floor and 10 seconds of grace: one request a second for
    40 s is served throughout, with one refresh per 10 s."""
    caplog.set_level(logging.INFO, logger="gateway")
    stack = await make_stack(clock=clock, access_token_ttl=5,
                             session={"refresh_grace": "10s", "refresh_min_interval": "10s"})
    await login(browser, stack.gateway, "/echo")
    before = token_requests(stack)
    for _ in range(40):
        clock.advance(1)
        assert await status_of(browser, stack.gateway + "/echo") == 200
    assert token_requests(stack) - before == 4
    warnings = [r.getMessage() for r in caplog.records
                if "access_token_lifetime_short" in r.getMessage()]
    assert len(warnings) == 1 and "lifetime=5s refresh_margin=60s" in warnings[0]


async def test_fifty_concurrent_requests_on_a_due_session_refresh_once(
        stack: Stack, browser: aiohttp.ClientSession, clock: FakeClock,
        switch: TokenEndpointSwitch) -> None:
    await login(browser, stack.gateway, "/echo")
    before = token_requests(stack)
    switch.delay = 0.3  # every request arrives while the refresh is under way
    clock.advance(TTL - 30)  # due, still usable: nobody waits for the refresh
    statuses = await asyncio.gather(*(status_of(browser, stack.gateway + f"/echo/{i}")
                                      for i in range(50)))
    assert statuses == [200] * 50
    assert token_requests(stack) == before + 1
