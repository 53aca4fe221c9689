"""End to end: back-channel logout from the IdP ends exactly the sessions it names."""

from __future__ import annotations

import secrets
import time
from typing import Any

import aiohttp
import pytest
from conftest import BROWSER_HEADERS, CLIENT_ID, Stack, StackFactory, login
from joserfc import jwt

from gateway.demo.idp import STATE

pytestmark = pytest.mark.e2e

EVENT = {"http://schemas.openid.net/event/backchannel-logout": {}}


@pytest.fixture(params=["memory", "redis"])
async def stack(request: pytest.FixtureRequest, make_stack: StackFactory) -> Stack:
    store = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    return await make_stack(store=store)


def logout_token(stack: Stack, **claims: Any) -> str:
    """Signed by the IdP's own key, as the IdP would send it."""
    key = stack.idp_app[STATE].key
    now = int(time.time())
    payload = {"iss": stack.idp, "aud": CLIENT_ID, "iat": now, "exp": now + 120,
               "jti": secrets.token_hex(8), "events": EVENT, **claims}
    return jwt.encode({"alg": "RS256", "kid": key.kid, "typ": "logout+jwt"}, payload, key)


async def post(stack: Stack, token: str) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http:
        resp = await http.post(stack.gateway + "/oauth2/backchannel_logout",
                               data={"logout_token": token})
        await resp.read()
        return resp


async def browser_for(stack: Stack, user: str) -> tuple[aiohttp.ClientSession, str]:
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                    headers=BROWSER_HEADERS)
    await login(session, stack.gateway, "/echo", user)
    async with session.get(stack.gateway + "/oauth2/userinfo") as resp:
        assert resp.status == 200
    sid = next(s for s in stack.idp_app[STATE].sessions)  # the IdP session just created
    stack.idp_app[STATE].sessions.clear()  # next login starts a new IdP session (new sid)
    return session, sid


async def signed_in(session: aiohttp.ClientSession, stack: Stack) -> bool:
    async with session.get(stack.gateway + "/oauth2/userinfo") as resp:
        return resp.status == 200


async def test_logout_by_sid_ends_that_session_only(stack: Stack) -> None:
    first, sid = await browser_for(stack, "alice")
    second, _ = await browser_for(stack, "alice")
    try:
        resp = await post(stack, logout_token(stack, sid=sid, sub="alice"))
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        assert not await signed_in(first, stack)
        assert await signed_in(second, stack)
    finally:
        await first.close()
        await second.close()


async def test_logout_by_sub_ends_every_session_of_that_user(stack: Stack) -> None:
    first, _ = await browser_for(stack, "alice")
    second, _ = await browser_for(stack, "alice")
    bob, _ = await browser_for(stack, "bob")
    try:
        assert (await post(stack, logout_token(stack, sub="alice"))).status == 200
        assert not await signed_in(first, stack)
        assert not await signed_in(second, stack)
        assert await signed_in(bob, stack)
    finally:
        for session in (first, second, bob):
            await session.close()


async def test_replayed_or_forged_logout_tokens_get_400_json(stack: Stack) -> None:
    token = logout_token(stack, sub="nobody", jti="fixed-jti")
    assert (await post(stack, token)).status == 200
    async with aiohttp.ClientSession() as http:
        for data in ({"logout_token": token}, {"logout_token": "forged.token.value"}, {}):
            async with http.post(stack.gateway + "/oauth2/backchannel_logout",
                                 data=data) as resp:
                assert resp.status == 400
                assert resp.headers["Cache-Control"] == "no-store"
                assert (await resp.json())["error"] == "invalid_request"


async def test_sign_out_by_post_needs_our_origin(stack: Stack) -> None:
    """Logout CSRF: a form on another site cannot end the user's session."""
    session, _ = await browser_for(stack, "alice")
    try:
        for headers in ({"Origin": "https://evil.example.com"},
                        {"Referer": "https://evil.example.com/page"}, {}):
            async with session.post(stack.gateway + "/oauth2/sign_out", headers=headers,
                                    allow_redirects=False) as resp:
                assert resp.status == 403
        assert await signed_in(session, stack)
        async with session.post(stack.gateway + "/oauth2/sign_out",
                                headers={"Origin": stack.gateway},
                                allow_redirects=False) as resp:
            assert resp.status == 302
        assert not await signed_in(session, stack)
    finally:
        await session.close()


async def test_sign_out_methods_are_configurable(make_stack: StackFactory) -> None:
    stack = await make_stack(session={"sign_out_methods": ["POST"]})
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/oauth2/sign_out",
                            headers={"Accept": "application/json"}) as resp:
            assert resp.status == 405


async def test_frontchannel_logout_is_off_by_default_and_ends_the_sid_when_on(
        make_stack: StackFactory, stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        url = f"{stack.gateway}/oauth2/frontchannel_logout?iss={stack.idp}&sid=x"
        async with http.get(url) as resp:
            assert resp.status == 404
    enabled = await make_stack(session={"frontchannel_logout": True})
    session, sid = await browser_for(enabled, "alice")
    try:
        async with aiohttp.ClientSession() as http:
            base = f"{enabled.gateway}/oauth2/frontchannel_logout"
            async with http.get(base, params={"iss": "https://evil.example.com",
                                              "sid": sid}) as resp:
                assert resp.status == 400
            assert await signed_in(session, enabled)
            async with http.get(base, params={"iss": enabled.idp, "sid": sid}) as resp:
                assert resp.status == 200
                assert "X-Frame-Options" not in resp.headers  # the IdP frames this page
        assert not await signed_in(session, enabled)
    finally:
        await session.close()
