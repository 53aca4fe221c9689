"""Step-up per route: a sign-in too old (max_auth_age) or too weak (acr_values) for a route
goes back to the IdP, asked for max_age and acr_values, and the new ID token must meet them."""

from __future__ import annotations

import dataclasses
import html.parser
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from conftest import FakeClock, StackFactory, idp_sign_in, login
from yarl import URL

from gateway.demo.idp import ACR_MFA, ACR_PASSWORD, DEMO_ONE_TIME_CODE, STATE
from gateway.runtime import RUNTIME

pytestmark = pytest.mark.e2e

def routes() -> list[dict[str, Any]]:
    return [{"name": "pay", "path_prefix": "/pay", "max_auth_age": "5m"},
            {"name": "vault", "path_prefix": "/vault", "acr_values": [ACR_MFA]},
            {"name": "app", "path_prefix": "/"}]


async def go(browser: aiohttp.ClientSession, url: str, **kw: Any) -> aiohttp.ClientResponse:
    resp = await browser.get(url, allow_redirects=False, **kw)
    await resp.read()
    return resp


async def session_claims(stack: Any, browser: aiohttp.ClientSession) -> dict[str, Any]:
    cookie = next(c.value for c in browser.cookie_jar if c.key == "gateway_session")
    loaded = await stack.runners[-1].app[RUNTIME].sessions.load(cookie)
    assert loaded is not None and loaded.session.identity.claims is not None
    return dict(loaded.session.identity.claims)


async def test_an_old_sign_in_is_sent_back_to_the_idp_with_max_age(
        make_stack: StackFactory, browser: aiohttp.ClientSession, clock: FakeClock) -> None:
    stack = await make_stack(clock=clock, routes=routes())
    await login(browser, stack.gateway, "/echo")
    assert (await go(browser, stack.gateway + "/pay/x")).status == 200  # fresh enough
    clock.advance(301)
    resp = await go(browser, stack.gateway + "/pay/x")
    assert resp.status == 302
    authorize = URL(resp.headers["Location"])
    assert authorize.query["max_age"] == "300" and "acr_values" not in authorize.query
    # The IdP still knows alice, but her sign-in is older than max_age: it asks again.
    assert (await go(browser, str(authorize))).status == 200
    callback = await idp_sign_in(browser, str(authorize), "alice")
    resp = await go(browser, callback)
    assert resp.status == 302 and resp.headers["Location"] == "/pay/x"
    assert (await go(browser, stack.gateway + "/pay/x")).status == 200
    assert (await session_claims(stack, browser))["auth_time"] == int(clock.now)
    # Routes without step-up never asked, and an API client is told what it lacks.
    clock.advance(301)
    assert (await go(browser, stack.gateway + "/echo")).status == 200
    resp = await go(browser, stack.gateway + "/pay/x", headers={"Accept": "application/json"})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == (
        'Bearer error="insufficient_user_authentication", max_age="300"')
    assert (await resp.json())["error"] == "insufficient_user_authentication"


class _FormFields(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "input" and values.get("type") == "hidden" and values.get("name"):
            self.fields[values["name"] or ""] = values.get("value") or ""


async def sign_in_with(browser: aiohttp.ClientSession, authorize: str,
                       **form: str) -> aiohttp.ClientResponse:
    page = await go(browser, authorize)
    assert page.status == 200
    parser = _FormFields()
    parser.feed(await page.text())
    return await browser.post(URL(authorize).join(URL("/authorize")),
                              data={**parser.fields, "username": "alice", "password": "alice",
                                    **form}, allow_redirects=False)


async def test_a_weak_sign_in_steps_up_to_the_acr_the_route_asks_for(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    stack = await make_stack(routes=routes())
    await login(browser, stack.gateway, "/echo")
    assert (await session_claims(stack, browser))["acr"] == ACR_PASSWORD
    resp = await go(browser, stack.gateway + "/vault/")
    assert resp.status == 302
    authorize = resp.headers["Location"]
    assert URL(authorize).query["acr_values"] == ACR_MFA
    refused = await sign_in_with(browser, authorize)  # a password alone will not do
    assert refused.status == 401 and "needs the one-time code" in await refused.text()
    resp = await sign_in_with(browser, authorize, otp=DEMO_ONE_TIME_CODE)
    assert resp.status == 302
    resp = await go(browser, resp.headers["Location"])  # the callback
    assert resp.status == 302 and resp.headers["Location"] == "/vault/"
    assert (await go(browser, stack.gateway + "/vault/")).status == 200
    claims = await session_claims(stack, browser)
    assert claims["acr"] == ACR_MFA and claims["amr"] == ["pwd", "otp"]


class IgnoresMaxAge:
    """An IdP that drops max_age and answers from the sign-in it remembers."""

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/authorize" and "max_age" in request.query:
            query = {k: v for k, v in request.query.items() if k != "max_age"}
            request = request.clone(rel_url=request.rel_url.with_query(query))
        return await handler(request)


async def test_an_idp_that_ignores_max_age_does_not_pass_an_old_sign_in_off_as_fresh(
        make_stack: StackFactory, browser: aiohttp.ClientSession, clock: FakeClock,
        caplog: pytest.LogCaptureFixture) -> None:
    stack = await make_stack(clock=clock, routes=routes(),
                             idp_middlewares=[IgnoresMaxAge().middleware])
    await login(browser, stack.gateway, "/echo")
    clock.advance(300 + 61)  # past max_age and the clock-skew leeway
    resp = await go(browser, stack.gateway + "/pay/x")
    resp = await go(browser, resp.headers["Location"])  # the IdP answers at once...
    assert resp.status == 302
    resp = await go(browser, resp.headers["Location"])  # ...and the callback refuses it
    assert resp.status == 400
    assert "claim_auth_time" in caplog.text  # the check that refused it
    # The old session is untouched (still good for routes without step-up).
    assert (await go(browser, stack.gateway + "/echo")).status == 200


async def test_a_refresh_is_not_a_sign_in(
        make_stack: StackFactory, browser: aiohttp.ClientSession, clock: FakeClock) -> None:
    """An IdP whose refreshed ID token moves auth_time forward must not let a refresh pass
    for the fresh sign-in a step-up route asks for: when and how stays the login's."""
    stack = await make_stack(clock=clock, routes=routes(), access_token_ttl=120)
    await login(browser, stack.gateway, "/echo")
    signed_in_at = (await session_claims(stack, browser))["auth_time"]
    state = stack.idp_app[STATE]
    clock.advance(301)
    for token, grant in list(state.refresh_tokens.items()):  # the IdP now says "just now"
        state.refresh_tokens[token] = dataclasses.replace(grant, sign_in=dataclasses.replace(
            grant.sign_in, auth_time=int(clock.now), acr=ACR_MFA))
    before = state.token_requests
    assert (await go(browser, stack.gateway + "/echo")).status == 200
    assert state.token_requests == before + 1  # refreshed
    claims = await session_claims(stack, browser)
    assert claims["auth_time"] == signed_in_at and claims["acr"] == ACR_PASSWORD
    assert (await go(browser, stack.gateway + "/pay/x")).status == 302  # still a step-up


async def test_a_first_sign_in_on_a_step_up_route_asks_for_it_at_once(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    """No second trip to the IdP: the sign-in a step-up route starts asks for its needs."""
    stack = await make_stack(routes=routes())
    resp = await go(browser, stack.gateway + "/vault/")
    assert resp.status == 302
    authorize = resp.headers["Location"]
    assert URL(authorize).query["acr_values"] == ACR_MFA
    resp = await sign_in_with(browser, authorize, otp=DEMO_ONE_TIME_CODE)
    resp = await go(browser, resp.headers["Location"])
    assert resp.headers["Location"] == "/vault/"
    assert (await go(browser, stack.gateway + "/vault/")).status == 200
    # An API client without a session is simply not signed in (no step-up talk).
    async with aiohttp.ClientSession() as api:
        async with api.get(stack.gateway + "/vault/",
                           headers={"Accept": "application/json"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "not_authenticated"


async def test_a_sign_in_started_elsewhere_asks_for_what_its_return_route_needs(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    """/oauth2/start?rd=... (a forward-auth front's redirect, a link) asks the IdP for the
    step-up of the route it returns to, so the user is not sent round twice."""
    stack = await make_stack(routes=routes())
    for rd, asked in (("/vault/x", {"acr_values": ACR_MFA}), ("/pay", {"max_age": "300"}),
                      ("/echo", {})):
        resp = await go(browser, f"{stack.gateway}/oauth2/start?rd={rd}")
        assert resp.status == 302
        query = URL(resp.headers["Location"]).query
        assert {k: query[k] for k in ("acr_values", "max_age") if k in query} == asked
