"""End to end: browser-like client -> gateway -> demo IdP and upstream, over real sockets.

Runs against both stores: the embedded memory store and a real redis-server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from http.cookies import SimpleCookie

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from conftest import (
    BROWSER_HEADERS,
    FakeClock,
    Stack,
    StackFactory,
    free_port,
    idp_sign_in,
    login,
    serve,
)
from joserfc.jwk import RSAKey
from yarl import URL

from gateway import observability
from gateway.app import build_app
from gateway.demo.idp import STATE

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def stack(make_stack: StackFactory, store: str) -> Stack:
    return await make_stack(store=store)


def session_cookie(browser: aiohttp.ClientSession) -> str | None:
    for cookie in browser.cookie_jar:
        if cookie.key == "gateway_session":
            return cookie.value
    return None


async def echo(browser: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with browser.get(url, allow_redirects=False) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


def header(echoed: dict[str, object], name: str) -> list[str]:
    pairs = echoed["headers"]
    assert isinstance(pairs, list)
    return [value for key, value in pairs if key.lower() == name.lower()]


async def start_login(browser: aiohttp.ClientSession, url: str) -> str:
    async with browser.get(url, allow_redirects=False) as resp:
        assert resp.status == 302
        return resp.headers["Location"]


async def test_browser_login_lands_on_the_exact_url_first_asked_for(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    resp = await login(browser, stack.gateway, "/echo/page?x=1&y=a%20b")
    assert resp.status == 200
    echoed = await resp.json()
    assert echoed["path"] == "/echo/page"
    assert echoed["query"] == "x=1&y=a%20b"
    assert header(echoed, "X-Forwarded-User") == ["alice"]
    assert header(echoed, "X-Forwarded-Email") == ["alice@example.com"]
    assert header(echoed, "X-Forwarded-Preferred-Username") == ["alice"]
    assert header(echoed, "X-Forwarded-Groups") == ["admins,staff"]


async def test_login_redirect_carries_state_nonce_and_pkce(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    authorize = URL(await start_login(browser, stack.gateway + "/"))
    assert str(authorize.origin()) == stack.idp
    query = authorize.query
    assert query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256"
    assert len(query["state"]) >= 43 and len(query["nonce"]) >= 43
    assert query["redirect_uri"] == stack.gateway + "/oauth2/callback"


async def test_api_client_without_session_gets_401_json_and_no_redirect(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        for headers in ({"Accept": "application/json"},
                        {**BROWSER_HEADERS, "X-Requested-With": "XMLHttpRequest"}):
            async with http.get(stack.gateway + "/echo", headers=headers,
                                allow_redirects=False) as resp:
                assert resp.status == 401
                assert "Location" not in resp.headers
                assert (await resp.json())["error"] == "not_authenticated"


async def test_callback_rejects_reused_state(stack: Stack,
                                             browser: aiohttp.ClientSession) -> None:
    """Replay: a callback URL used once cannot create a second session."""
    authorize = await start_login(browser, stack.gateway + "/echo")
    callback = await idp_sign_in(browser, authorize, "alice")
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302
    first = session_cookie(browser)
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 400
        assert "gateway_session" not in resp.cookies
    assert session_cookie(browser) == first


async def test_callback_replayed_from_another_browser_creates_no_session(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """Login CSRF: a victim's browser must not accept a login the attacker started."""
    authorize = await start_login(browser, stack.gateway + "/echo")
    callback = await idp_sign_in(browser, authorize, "alice")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers=BROWSER_HEADERS) as other:
        async with other.get(callback, allow_redirects=False) as resp:
            assert resp.status == 400
            assert "gateway_session" not in resp.cookies
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 400  # the replay consumed the state: single use


async def test_unknown_state_is_refused(stack: Stack, browser: aiohttp.ClientSession) -> None:
    async with browser.get(stack.gateway + "/oauth2/callback?state=made-up&code=x",
                           allow_redirects=False) as resp:
        assert resp.status == 400
        assert "Sign-in failed" in await resp.text()
        assert "gateway_session" not in resp.cookies


async def test_parallel_logins_in_two_tabs_both_complete(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    first = await start_login(browser, stack.gateway + "/echo/one")
    second = await start_login(browser, stack.gateway + "/echo/two")
    callback_two = await idp_sign_in(browser, second, "alice")
    callback_one = await idp_sign_in(browser, first, "alice")
    for callback, target in ((callback_two, "/echo/two"), (callback_one, "/echo/one")):
        async with browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == target


async def test_idp_error_on_callback_shows_clear_page_and_no_session(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    authorize = URL(await start_login(browser, stack.gateway + "/echo"))
    state = authorize.query["state"]
    url = f"{stack.gateway}/oauth2/callback?error=access_denied&state={state}"
    async with browser.get(url, allow_redirects=False) as resp:
        assert resp.status == 400
        text = await resp.text()
        assert "access_denied" in text
        assert "Traceback" not in text
        assert "gateway_session" not in resp.cookies


async def test_session_cookie_is_opaque_httponly_lax_and_new_on_every_login(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    authorize = await start_login(browser, stack.gateway + "/echo")
    callback = await idp_sign_in(browser, authorize, "alice")
    async with browser.get(callback, allow_redirects=False) as resp:
        raw = resp.headers.getall("Set-Cookie")
    cookie = SimpleCookie()
    for value in raw:
        cookie.load(value)
    morsel = cookie["gateway_session"]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["path"] == "/"
    assert "alice" not in morsel.value and len(morsel.value) == 87
    first = morsel.value
    # Fixation: logging in again while holding a session yields a new cookie, and the old one
    # is dead on the server.
    authorize = await start_login(browser, stack.gateway + "/oauth2/start?rd=/echo")
    callback = await idp_sign_in(browser, authorize, "alice")
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302
    assert session_cookie(browser) not in (None, first)
    async with aiohttp.ClientSession() as other:
        async with other.get(stack.gateway + "/echo", cookies={"gateway_session": first},
                             headers={"Accept": "application/json"}) as resp:
            assert resp.status == 401


async def test_userinfo_returns_the_session_identity_and_401_without_one(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    async with browser.get(stack.gateway + "/oauth2/userinfo") as resp:
        assert resp.status == 401
    await login(browser, stack.gateway, "/echo", user="bob")
    async with browser.get(stack.gateway + "/oauth2/userinfo") as resp:
        info = await resp.json()
    assert info["user"] == "bob"
    assert info["email"] == "bob@example.com"
    assert info["groups"] == ["staff"]


async def test_user_outside_allowed_group_gets_403_page(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    await login(browser, stack.gateway, "/echo", user="bob")
    async with browser.get(stack.gateway + "/admin/x", allow_redirects=False) as resp:
        assert resp.status == 403
        text = await resp.text()
        assert "Access denied" in text
        assert "admins" not in text  # the page names no rule
        # who was refused, and a way to try another account
        assert "You are signed in as <strong>bob</strong>." in text
        assert '<form method="post" action="/oauth2/sign_out">' in text
    async with browser.get(stack.gateway + "/admin/x", headers={"Accept": "application/json"},
                           allow_redirects=False) as resp:
        assert (await resp.json())["signed_in_as"] == "bob"
    async with browser.post(stack.gateway + "/oauth2/sign_out", allow_redirects=False,
                            headers={"Origin": stack.gateway}) as resp:
        assert resp.status == 302  # the page's form signs out


async def test_sign_out_without_rd_ends_on_the_gateways_signed_out_page(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """It used to end on / and so straight on the IdP's login form."""
    await login(browser, stack.gateway, "/echo")
    async with browser.get(stack.gateway + "/oauth2/sign_out", allow_redirects=False) as resp:
        end_session = URL(resp.headers["Location"])
    assert "state" not in end_session.query
    async with browser.get(end_session, allow_redirects=False) as resp:
        landed = resp.headers["Location"]
    assert landed == stack.gateway + "/oauth2/signed_out"
    async with browser.get(landed, allow_redirects=False) as resp:
        assert resp.status == 200
        page = await resp.text()
    assert "You are signed out." in page and 'href="/oauth2/start"' in page
    async with browser.get(stack.gateway + "/oauth2/signed_out?state=//evil.example",
                           allow_redirects=False) as resp:
        assert resp.status == 200  # a hostile state is just the page, never a redirect


async def test_dot_segments_cannot_reach_admin_under_public_policy(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """Path confusion: /public/../admin is /admin, checked and forwarded as /admin."""
    for raw in ("/public/../admin/x", "/public/%2e%2e/admin/x", "/public/.%2E/admin/x"):
        async with browser.get(URL(stack.gateway + raw, encoded=True),
                               allow_redirects=False) as resp:
            assert resp.status == 302, raw  # login required: the admin route's policy
    async with browser.get(URL(stack.gateway + "/public/%2Fadmin", encoded=True)) as resp:
        assert resp.status == 400


async def test_client_identity_headers_are_stripped_on_public_and_protected_routes(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """Spoofing: client-sent identity headers never reach the upstream."""
    spoof = {"X-Forwarded-User": "admin", "x_forwarded_email": "root@example.com",
             "X-FORWARDED-GROUPS": "admins"}
    async with browser.get(stack.gateway + "/public/echo", headers=spoof) as resp:
        echoed = await resp.json()
    for name in ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Groups",
                 "x_forwarded_email"):
        assert header(echoed, name) == []
    await login(browser, stack.gateway, "/echo", user="bob")
    async with browser.get(stack.gateway + "/echo", headers=spoof) as resp:
        echoed = await resp.json()
    assert header(echoed, "X-Forwarded-User") == ["bob"]
    assert header(echoed, "X-Forwarded-Groups") == ["staff"]
    assert header(echoed, "x_forwarded_email") == []


async def test_gateway_cookies_are_not_sent_upstream(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    await login(browser, stack.gateway, "/echo")
    async with browser.get(stack.gateway + "/echo", headers={"Cookie": "app=1"}) as resp:
        echoed = await resp.json()
    cookies = "; ".join(header(echoed, "Cookie"))
    assert "gateway_session" not in cookies


async def test_sign_out_deletes_the_session_and_goes_through_the_idp_logout(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    await login(browser, stack.gateway, "/echo")
    stolen = session_cookie(browser)
    async with browser.get(stack.gateway + "/oauth2/sign_out?rd=/bye",
                           allow_redirects=False) as resp:
        assert resp.status == 302
        target = URL(resp.headers["Location"])
    assert str(target.origin()) == stack.idp
    # one registered URI; where the user wants to land travels as state and comes back
    assert target.query["post_logout_redirect_uri"] == stack.gateway + "/oauth2/signed_out"
    assert target.query["state"] == "/bye"
    assert target.query["client_id"] == "gateway-test"
    assert "id_token_hint" in target.query
    async with browser.get(target, allow_redirects=False) as resp:  # the IdP's logout
        assert resp.status == 302
        back = URL(resp.headers["Location"])
    assert (str(back.with_query(None)), back.query["state"]) == (
        stack.gateway + "/oauth2/signed_out", "/bye")
    async with browser.get(back, allow_redirects=False) as resp:
        assert resp.headers["Location"] == "/bye"
    async with aiohttp.ClientSession() as attacker:  # the old cookie is dead on the server
        async with attacker.get(stack.gateway + "/echo", cookies={"gateway_session": stolen},
                                headers={"Accept": "application/json"}) as resp:
            assert resp.status == 401


async def test_hostile_rd_is_refused_and_login_returns_home(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    for rd in ("//evil.com", "/\\evil.com", "https://evil.com", "/%2F%2Fevil.com"):
        url = URL(stack.gateway + "/oauth2/start").with_query(rd=rd)
        authorize = await start_login(browser, str(url))
        callback = await idp_sign_in(browser, authorize, "alice")
        async with browser.get(callback, allow_redirects=False) as resp:
            assert resp.headers["Location"] == "/", rd


async def test_missing_claims_are_fetched_from_userinfo(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    stack = await make_stack(userinfo_only_claims=True)
    resp = await login(browser, stack.gateway, "/echo")
    echoed = await resp.json()
    assert header(echoed, "X-Forwarded-Email") == ["alice@example.com"]
    assert header(echoed, "X-Forwarded-Groups") == ["admins,staff"]


async def test_redis_sessions_survive_a_gateway_restart(
        make_stack: StackFactory, redis_url: str, browser: aiohttp.ClientSession) -> None:
    stack = await make_stack(store=redis_url)
    await login(browser, stack.gateway, "/echo")
    await stack.runners[-1].cleanup()
    runner, _ = await serve(build_app(stack.config), URL(stack.gateway).port)
    try:
        async with browser.get(stack.gateway + "/echo", allow_redirects=False) as resp:
            assert resp.status == 200
            assert header(await resp.json(), "X-Forwarded-User") == ["alice"]
    finally:
        await runner.cleanup()


async def test_idp_down_gives_503_page_on_login(make_stack: StackFactory,
                                                browser: aiohttp.ClientSession) -> None:
    stack = await make_stack()
    await stack.runners[0].cleanup()  # the IdP goes away
    await stack.runners[-1].cleanup()  # and a fresh gateway starts without its metadata
    runner, _ = await serve(build_app(stack.config), URL(stack.gateway).port)
    try:
        async with browser.get(stack.gateway + "/echo", allow_redirects=False) as resp:
            assert resp.status == 503
            assert "identity provider" in (await resp.text()).lower()
        async with browser.get(stack.gateway + "/oauth2/readyz") as resp:
            assert resp.status == 503
        async with browser.get(stack.gateway + "/public/echo") as resp:
            assert resp.status == 200  # public routes do not need the IdP
    finally:
        await runner.cleanup()


async def test_store_down_fails_closed_with_503_but_public_routes_work(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    stack = await make_stack(store=dead, session={"store_timeout": "500ms"})
    async with browser.get(stack.gateway + "/echo", allow_redirects=False,
                           cookies={"gateway_session": "a" * 43 + "." + "b" * 43}) as resp:
        assert resp.status == 503
        assert "Traceback" not in await resp.text()
    async with browser.get(stack.gateway + "/oauth2/readyz?full") as resp:
        assert resp.status == 503
        assert (await resp.json())["idp"] == "ok"
    async with browser.get(stack.gateway + "/oauth2/readyz") as resp:
        assert resp.status == 200  # not out of the balancer: public routes still work
    async with browser.get(stack.gateway + "/public/echo") as resp:
        assert resp.status == 200


async def test_health_and_ready_endpoints(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/oauth2/healthz") as resp:
            assert resp.status == 200
        async with http.get(stack.gateway + "/oauth2/readyz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ready", "idp": "ok"}
        async with http.get(stack.gateway + "/oauth2/readyz?full") as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ready", "idp": "ok", "store": "ok"}


async def test_tokens_codes_and_cookies_never_reach_the_logs(
        stack: Stack, browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    authorize = URL(await start_login(browser, stack.gateway + "/echo"))
    callback = URL(await idp_sign_in(browser, str(authorize), "alice"))
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302
    async with browser.get(stack.gateway + "/echo") as resp:
        assert resp.status == 200
    cookie = session_cookie(browser)
    assert cookie
    secrets_seen = [callback.query["code"], callback.query["state"], authorize.query["nonce"],
                    *cookie.split(".")]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "login_succeeded sub=alice" in logged
    as_json = "\n".join(observability._JSONFormatter().format(r) for r in caplog.records)
    assert '"event": "login_succeeded", "sub": "alice"' in as_json
    for value in secrets_seen:
        assert value not in logged
        assert value not in as_json


async def test_authorization_response_from_another_issuer_is_refused(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """Mix-up (RFC 9207): a code issued by another IdP must not be redeemed at ours."""
    authorize = await start_login(browser, stack.gateway + "/echo")
    callback = URL(await idp_sign_in(browser, authorize, "alice"))
    forged = callback.update_query(iss="https://evil.example.com")
    async with browser.get(forged, allow_redirects=False) as resp:
        assert resp.status == 400
        assert "gateway_session" not in resp.cookies


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_sign_in_starts_are_limited_per_client_address(
        make_stack: StackFactory, clock: FakeClock, store: str,
        request: pytest.FixtureRequest) -> None:
    """Each start stores a login attempt: an anonymous flood must not fill the store."""
    url = request.getfixturevalue("redis_url") if store == "redis" else "memory://"
    stack = await make_stack(store=url, clock=clock, server={
        "login_starts_per_minute": 3, "trusted_proxies": ["127.0.0.1/32"]})

    async def start(path: str, forwarded_for: str = "198.51.100.7") -> aiohttp.ClientResponse:
        async with aiohttp.ClientSession() as http:
            resp = await http.get(stack.gateway + path, allow_redirects=False,
                                  headers={**BROWSER_HEADERS, "X-Forwarded-For": forwarded_for})
            await resp.read()
            return resp

    assert [(await start(p)).status for p in ("/", "/a", "/oauth2/start")] == [302] * 3
    refused = await start("/b", forwarded_for="9.9.9.9, 198.51.100.7")  # forged left part
    assert refused.status == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "Too many sign-in attempts" in await refused.text()
    assert (await start("/", forwarded_for="198.51.100.8")).status == 302  # someone else
    assert (await start("/", forwarded_for="2001:db8::1")).status == 302
    clock.advance(60)
    assert (await start("/")).status == 302  # the next minute


async def test_subresource_requests_cannot_start_a_sign_in(
        make_stack: StackFactory) -> None:
    """Another site's <img src=/oauth2/start> would spend a whole NAT's sign-in budget."""
    stack = await make_stack(server={"login_starts_per_minute": 1})
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(stack.gateway + "/oauth2/start", allow_redirects=False,
                                headers={"Sec-Fetch-Dest": "image"}) as resp:
                assert resp.status == 400
        async with http.get(stack.gateway + "/oauth2/start", allow_redirects=False,
                            headers={"Sec-Fetch-Dest": "document"}) as resp:
            assert resp.status == 302  # the budget was not spent


class IdPTamper:
    """Counts userinfo calls, and can swap the access token in the token response (token
    substitution: the ID token's at_hash then names another token)."""

    def __init__(self) -> None:
        self.swap_access_token = False
        self.userinfo_calls = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/userinfo":
            self.userinfo_calls += 1
        response = await handler(request)
        if request.path == "/token" and self.swap_access_token:
            assert isinstance(response, web.Response) and response.text is not None
            body = json.loads(response.text)
            body["access_token"] = "another-users-token-" + "x" * 20
            return web.json_response(body)
        return response


async def test_an_access_token_not_matching_at_hash_ends_the_login_before_it_is_used(
        make_stack: StackFactory, browser: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    tamper = IdPTamper()
    stack = await make_stack(userinfo_only_claims=True, idp_middlewares=[tamper.middleware])
    await login(browser, stack.gateway, "/echo")  # the demo IdP sends at_hash: it matches
    assert tamper.userinfo_calls == 1
    tamper.swap_access_token = True
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers=BROWSER_HEADERS) as other:
        callback = await idp_sign_in(other, await start_login(other, stack.gateway + "/echo"),
                                     "bob")
        async with other.get(callback, allow_redirects=False) as resp:
            assert resp.status == 400
            assert "Sign-in failed" in await resp.text()
        assert session_cookie(other) is None
    assert tamper.userinfo_calls == 1  # userinfo never saw the substituted token
    assert "ID token refused: at_hash_mismatch" in caplog.text


async def test_a_rotated_signing_key_is_accepted_on_the_first_login_after_it(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """The IdP rotates its key seconds after the gateway last fetched the JWKS."""
    await login(browser, stack.gateway, "/echo")
    stack.idp_app[STATE].key = RSAKey.generate_key(2048, parameters={"kid": "rotated"})
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers=BROWSER_HEADERS) as other:
        resp = await login(other, stack.gateway, "/echo", user="bob")
        assert resp.status == 200


def unverify_email(stack: Stack, user: str) -> None:
    state = stack.idp_app[STATE]
    state.users = {**state.users,
                   user: dataclasses.replace(state.users[user], email_verified=False)}


@pytest.mark.parametrize("allow_unverified", [False, True])
async def test_an_unverified_email_is_sent_upstream_only_when_the_operator_allows_it(
        make_stack: StackFactory, browser: aiohttp.ClientSession, allow_unverified: bool) -> None:
    """Upstreams that key accounts by email (Grafana, Gitea) would hand bob's account to
    whoever the IdP let claim bob's address."""
    stack = await make_stack(oidc={"allow_unverified_email": allow_unverified})
    unverify_email(stack, "bob")
    echoed = await (await login(browser, stack.gateway, "/echo", user="bob")).json()
    assert header(echoed, "X-Forwarded-User") == ["bob"]
    assert header(echoed, "X-Forwarded-Email") == (["bob@example.com"] if allow_unverified
                                                   else [])


PEER_HEADERS = {
    "OIDC_CLAIM_email": "root@example.com", "OIDC-Claim-Groups": "admins",
    "oidc_access_token": "forged", "OIDC_id_token": "forged", "X-Auth-Request-User": "root",
    "x-auth-request-email": "root@example.com", "X-Forwarded-Access-Token": "forged",
    "Remote-User": "root", "remote_groups": "admins", "X-Remote-User": "root",
    "X-Remote-Group": "admins", "X-Email": "root@example.com", "X-User": "root",
    "GAP-Auth": "root", "X-Pomerium-Claim-Email": "root@example.com",
    "X-Corp-Role": "admin", "x_corp_id": "1", "X-App-User": "root",
}


async def test_identity_headers_of_other_login_proxies_are_stripped_in_every_spelling(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    """Upstreams migrating from mod_auth_openidc, oauth2-proxy, Pomerium or Authelia may still
    read those proxies' headers, so a client's copy never reaches them; nor do the names the
    operator lists in server.strip_request_headers."""
    stack = await make_stack(server={"strip_request_headers": ["X-Corp-*", "X-App-User"]})
    await login(browser, stack.gateway, "/echo", user="bob")
    for path in ("/echo", "/public/echo"):
        async with browser.get(stack.gateway + path, headers=PEER_HEADERS) as resp:
            echoed = await resp.json()
        for name in PEER_HEADERS:
            assert header(echoed, name) == [], (path, name)
        assert header(echoed, "X-Forwarded-User") == (["bob"] if path == "/echo" else [])


async def test_a_client_inside_trusted_proxies_cannot_mint_a_bucket_per_request(
        make_stack: StackFactory, clock: FakeClock) -> None:
    """The test client is at 127.0.0.1, inside trusted_proxies, so its X-Forwarded-For is
    believed: a fresh forged address per request still counts against the peer."""
    stack = await make_stack(clock=clock, server={
        "login_starts_per_minute": 2, "login_starts_per_minute_per_proxy": 5,
        "trusted_proxies": ["127.0.0.0/8"]})
    statuses = []
    async with aiohttp.ClientSession() as http:
        for i in range(8):
            async with http.get(stack.gateway + "/", allow_redirects=False,
                                headers={**BROWSER_HEADERS,
                                         "X-Forwarded-For": f"203.0.113.{i}"}) as resp:
                statuses.append(resp.status)
    assert statuses == [302] * 5 + [429] * 3


async def test_a_forging_client_behind_the_balancer_cannot_mint_buckets_either(
        make_stack: StackFactory, clock: FakeClock) -> None:
    """A client whose own address is inside trusted_proxies, behind the load balancer, writes
    new addresses each time (trusted-looking ones too): its own address, which the balancer
    appends, vouches every time, so its starts are bounded."""
    stack = await make_stack(clock=clock, server={
        "login_starts_per_minute": 2, "login_starts_per_minute_per_proxy": 5,
        "trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]})

    async def start(forwarded_for: str) -> int:
        async with aiohttp.ClientSession() as http:
            async with http.get(stack.gateway + "/", allow_redirects=False,
                                headers={**BROWSER_HEADERS,
                                         "X-Forwarded-For": forwarded_for}) as resp:
                return resp.status

    forged = [await start(f"203.0.113.{i}, 10.9.0.{i}, 10.1.2.3") for i in range(8)]
    assert forged == [302] * 5 + [429] * 3
    # The documented price: the balancer vouched for all of them, so its budget is spent
    # for the rest of the minute too (raise login_starts_per_minute_per_proxy for big fronts).
    assert await start("198.51.100.7") == 429
    clock.advance(60)
    assert await start("198.51.100.7") == 302


async def test_no_response_names_the_server_software_or_its_version(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """Fingerprinting: neither the gateway's own answers nor proxied ones say what runs."""
    await login(browser, stack.gateway, "/echo")
    async with aiohttp.ClientSession() as http:
        for url in (stack.gateway + "/public/echo", stack.gateway + "/oauth2/healthz",
                    stack.gateway + "/nope/../oauth2/x", stack.gateway + "/echo"):
            async with http.get(url, allow_redirects=False) as resp:
                assert resp.headers.getall("Server") == ["gateway"], url
    async with browser.get(stack.gateway + "/echo") as resp:  # proxied, with a session
        assert resp.headers.getall("Server") == ["gateway"]
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(stack.gateway).port)
    writer.write(b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n")  # refused by the parser itself
    head = (await reader.read(4096)).split(b"\r\n\r\n")[0]
    writer.close()
    assert b"400" in head.split(b"\r\n")[0] and b"\r\nServer: gateway" in head


async def test_the_first_login_without_the_groups_claim_is_warned_about_once(
        make_stack: StackFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Seen: every admin got 403 with `"groups": []` and nothing said why."""
    caplog.set_level(logging.WARNING, logger="gateway")
    stack = await make_stack(oidc={"groups_claim": "roles"})
    for user in ("alice", "bob"):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                         headers=BROWSER_HEADERS) as http:
            await login(http, stack.gateway, "/echo", user=user)
            async with http.get(stack.gateway + "/admin/x", allow_redirects=False) as resp:
                assert resp.status == 403
    warned = [r.getMessage() for r in caplog.records if "groups_claim_missing" in r.getMessage()]
    assert len(warned) == 1
    assert "claim=roles scopes=openid email profile" in warned[0]


async def test_an_issuer_that_differs_from_discovery_is_named_in_readyz_and_the_page(
        make_stack: StackFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Seen: a trailing slash in oidc.issuer, and discovery retried forever saying only
    '!= configured issuer'."""
    stack = await make_stack()
    wrong = await make_stack(oidc={"issuer": stack.idp + "/"})
    async with aiohttp.ClientSession() as http:
        async with http.get(wrong.gateway + "/oauth2/readyz") as resp:
            assert resp.status == 503
            reason = (await resp.json())["idp"]
        async with http.get(wrong.gateway + "/", headers=BROWSER_HEADERS,
                            allow_redirects=False) as resp:
            page = await resp.text()
    for text in (reason, page.replace("&#x27;", "'")):
        assert f"'{stack.idp}'" in text and f"'{stack.idp}/'" in text
    assert "Sign-in misconfigured" in page
    assert f"is not oidc.issuer '{stack.idp}/'" in caplog.text


async def test_token_endpoint_errors_are_logged_with_their_description(
        make_stack: StackFactory, browser: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    @web.middleware
    async def refuse(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/token":
            return web.json_response({"error": "invalid_client",
                                      "error_description": "client secret mismatch"}, status=401)
        return await handler(request)

    stack = await make_stack(idp_middlewares=[refuse])
    callback = await idp_sign_in(browser, await start_login(browser, stack.gateway + "/"), "bob")
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 502
    assert (f"token endpoint {stack.idp}/token answered HTTP 401 (invalid_client: client "
            "secret mismatch)") in caplog.text
