"""End to end against an OpenID Provider this project did not write: npm `oidc-provider`.

Login, identity headers upstream and sign-out through the gateway, with the OP doing its own
discovery, PKCE, ID token signing and RP-initiated logout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from conftest import BROWSER_HEADERS, CLIENT_ID, CLIENT_SECRET, free_port, raw_config, serve
from nodeop import follow_op, node_op_available, start_node_op
from yarl import URL

from gateway import config as config_module
from gateway.app import build_app
from gateway.demo.upstream import create_upstream_app

pytestmark = pytest.mark.e2e


SCOPES = ("openid", "email", "profile", "groups")


@dataclass
class NodeStack:
    gateway: str
    issuer: str


@contextlib.asynccontextmanager
async def node_gateway(*, store: str = "memory://", scopes: Sequence[str] = SCOPES,
                       session: dict[str, str] | None = None,
                       routes: list[dict[str, Any]] | None = None,
                       policies: dict[str, Any] | None = None,
                       **op_options: Any) -> AsyncIterator[NodeStack]:
    """oidc-provider, the demo upstream and a gateway registered as the OP's client."""
    reason = node_op_available()
    if reason:
        pytest.skip(reason)
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    async with start_node_op(client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                             redirect_uris=[gateway + "/oauth2/callback"],
                             post_logout_redirect_uris=[gateway + "/oauth2/signed_out"],
                             backchannel_logout_uri=gateway + "/oauth2/backchannel_logout",
                             **op_options) as issuer:
        upstream_runner, upstream = await serve(create_upstream_app())
        raw = raw_config(gateway, issuer, upstream, store=store, session=session or {},
                         routes=routes)
        raw["oidc"]["scopes"] = list(scopes)
        if policies:
            raw["policies"] = policies
        runner, _ = await serve(build_app(config_module.parse(raw, {"SECRET": CLIENT_SECRET})),
                                port)
        try:
            yield NodeStack(gateway, issuer)
        finally:
            await runner.cleanup()
            await upstream_runner.cleanup()


@pytest.fixture(params=["memory", "redis"])
async def node_stack(request: pytest.FixtureRequest) -> AsyncIterator[NodeStack]:
    store = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    async with node_gateway(store=store) as stack:
        yield stack


async def sign_in(browser: aiohttp.ClientSession, stack: NodeStack, path: str,
                  user: str) -> None:
    async with browser.get(stack.gateway + path, allow_redirects=False) as resp:
        assert resp.status == 302
        authorize = resp.headers["Location"]
    assert authorize.startswith(stack.issuer)
    callback = await follow_op(browser, authorize, stack.issuer,
                               {"login": user, "password": "any"})
    assert callback.startswith(stack.gateway + "/oauth2/callback?")
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        assert resp.headers["Location"] == path


def headers_of(echoed: dict[str, object]) -> dict[str, str]:
    pairs = echoed["headers"]
    assert isinstance(pairs, list)
    return {name.lower(): value for name, value in pairs}


async def test_login_through_oidc_provider_sends_identity_headers_upstream(
        node_stack: NodeStack, browser: aiohttp.ClientSession) -> None:
    await sign_in(browser, node_stack, "/echo/x?q=1", "alice")
    async with browser.get(node_stack.gateway + "/echo/x?q=1",
                           headers={"X-Forwarded-User": "mallory"}) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    received = headers_of(echoed)
    assert echoed["query"] == "q=1"
    assert received["x-forwarded-user"] == "alice"
    assert received["x-forwarded-email"] == "alice@example.org"
    assert received["x-forwarded-preferred-username"] == "alice"
    assert received["x-forwarded-groups"] == "admins,staff"


async def test_group_rule_applies_to_oidc_provider_users(
        node_stack: NodeStack, browser: aiohttp.ClientSession) -> None:
    await sign_in(browser, node_stack, "/echo", "bob")
    async with browser.get(node_stack.gateway + "/admin/", allow_redirects=False) as resp:
        assert resp.status == 403


async def test_policies_on_claims_deny_and_methods_with_oidc_provider_users(
        caplog: pytest.LogCaptureFixture) -> None:
    """A named policy on the OP's own claims (a nested roles object and a plain one), a deny
    rule that wins over a matching allow rule, a rule for reads only, and a route that takes
    only GET; each decision is logged with the rule that made it."""
    policies = {"engineering": {
        "allow": [{"claims": {"realm_access.roles": "admin"}},
                  {"claims": {"department": "eng"}, "methods": ["GET"]}],
        "deny": {"emails": ["mallory@example.org"]}}}
    routes = [{"name": "reports", "path_prefix": "/reports", "policy": "engineering"},
              {"name": "readonly", "path_prefix": "/ro", "methods": ["GET"]},
              {"name": "app", "path_prefix": "/"}]
    caplog.set_level(logging.INFO, logger="gateway")
    async with node_gateway(routes=routes, policies=policies) as stack:
        expected = {  # user -> (GET status, POST status)
            "alice": (200, 200),  # an admin by role: allow[0], any method
            "bob": (200, 403),  # an engineer: allow[1], reads only
            "carol": (403, 403),  # sales, no admin role: no rule matches
            "mallory": (403, 403),  # an admin by role, but denied by email first
        }
        for user, (get_status, post_status) in expected.items():
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                             headers=BROWSER_HEADERS) as browser:
                await sign_in(browser, stack, "/echo", user)
                async with browser.get(stack.gateway + "/reports/q") as resp:
                    assert resp.status == get_status, user
                async with browser.post(stack.gateway + "/reports/q", data=b"x") as resp:
                    assert resp.status == post_status, user
                async with browser.put(stack.gateway + "/ro/x", data=b"x") as resp:
                    assert resp.status == 405
                    assert resp.headers["Allow"] == "GET, HEAD"
        async with aiohttp.ClientSession(headers=BROWSER_HEADERS) as anonymous:
            async with anonymous.put(stack.gateway + "/ro/x", allow_redirects=False) as resp:
                assert resp.status == 405  # the method is refused before any sign-in
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    decided = {(line.split()[0], line.split()[-2], line.split()[-1]) for line in lines
               if " /reports/q " in line}
    assert decided == {
        ("GET", "user=alice", "rule=policies.engineering.allow[0]"),
        ("POST", "user=alice", "rule=policies.engineering.allow[0]"),
        ("GET", "user=bob", "rule=policies.engineering.allow[1]"),
        ("POST", "user=bob", "rule=policies.engineering.allow"),
        ("GET", "user=carol", "rule=policies.engineering.allow"),
        ("POST", "user=carol", "rule=policies.engineering.allow"),
        ("GET", "user=mallory", "rule=policies.engineering.deny[0]"),
        ("POST", "user=mallory", "rule=policies.engineering.deny[0]"),
    }


async def test_route_headers_carry_oidc_provider_claims_and_the_id_token() -> None:
    routes = [{"name": "app", "path_prefix": "/", "pass_id_token": True,
               "headers": {"X-Department": "{department}",
                           "X-Roles": "{realm_access.roles}",
                           "X-Who": "{name} <{email}>",
                           "X-Missing": "{no_such_claim}"}}]
    async with node_gateway(routes=routes) as stack, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=BROWSER_HEADERS) as browser:
        await sign_in(browser, stack, "/echo", "alice")
        forged = {"X-Department": "finance", "X_Roles": "root", "X-Missing": "forged",
                  "X-Forwarded-Id-Token": "forged"}
        async with browser.get(stack.gateway + "/echo", headers=forged) as resp:
            received = headers_of(await resp.json())
    assert received["x-department"] == "eng"
    assert received["x-roles"] == "admin,user"
    assert received["x-who"] == "alice <alice@example.org>"
    assert "x-missing" not in received and "x_roles" not in received
    id_token = received["x-forwarded-id-token"]
    assert id_token.count(".") == 2 and "forged" not in id_token  # the OP's signed JWT


async def test_max_auth_age_makes_oidc_provider_ask_for_the_password_again() -> None:
    """A real OP's max_age: past the route's max_auth_age the gateway asks for max_age, the OP
    shows its login form again (it does not answer from its session), and the new ID token's
    auth_time passes the gateway's check."""
    routes = [{"name": "pay", "path_prefix": "/pay", "max_auth_age": "2s"},
              {"name": "app", "path_prefix": "/"}]
    async with node_gateway(routes=routes) as stack, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=BROWSER_HEADERS) as browser:
        await sign_in(browser, stack, "/pay/x", "alice")
        async with browser.get(stack.gateway + "/pay/x", allow_redirects=False) as resp:
            assert resp.status == 200
        await asyncio.sleep(3.1)
        async with browser.get(stack.gateway + "/pay/x", allow_redirects=False) as resp:
            assert resp.status == 302
            authorize = resp.headers["Location"]
        assert URL(authorize).query["max_age"] == "2"
        async with browser.get(authorize, allow_redirects=False) as resp:
            # not straight back to the gateway: the OP wants the user to sign in again
            assert not resp.headers.get("Location", "").startswith(stack.gateway)
        callback = await follow_op(browser, authorize, stack.issuer,
                                   {"login": "alice", "password": "any"})
        async with browser.get(callback, allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/pay/x"
        async with browser.get(stack.gateway + "/pay/x", allow_redirects=False) as resp:
            assert resp.status == 200


async def test_sign_out_ends_the_session_at_the_gateway_and_at_oidc_provider(
        node_stack: NodeStack, browser: aiohttp.ClientSession) -> None:
    await sign_in(browser, node_stack, "/echo", "alice")
    async with browser.get(node_stack.gateway + "/oauth2/sign_out",
                           allow_redirects=False) as resp:
        assert resp.status == 302
        end_session = resp.headers["Location"]
    signed_out = node_stack.gateway + "/oauth2/signed_out"
    assert URL(end_session).query["post_logout_redirect_uri"] == signed_out
    # The OP asks for confirmation, then sends the browser to the registered URI.
    landed = await follow_op(browser, end_session, node_stack.issuer, {"logout": "yes"})
    assert landed == signed_out
    async with browser.get(landed) as resp:
        assert resp.status == 200 and "You are signed out." in await resp.text()
    async with browser.get(node_stack.gateway + "/echo", allow_redirects=False) as resp:
        assert resp.status == 302  # no session: back into a login
        authorize = resp.headers["Location"]
    # The OP session is gone too: it shows its login form instead of answering at once.
    async with browser.get(authorize, allow_redirects=True) as resp:
        assert 'name="login"' in await resp.text()


async def test_logout_at_oidc_provider_ends_only_that_browsers_session_by_back_channel(
        node_stack: NodeStack, browser: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers=BROWSER_HEADERS) as other:
        await sign_in(browser, node_stack, "/echo", "alice")
        await sign_in(other, node_stack, "/echo", "alice")
        async with browser.get(node_stack.issuer + "/.well-known/openid-configuration") as resp:
            discovery = await resp.json()
        assert discovery["backchannel_logout_supported"] is True
        # The user signs out at the OP itself (another app's sign-out button, say): the OP
        # tells the gateway by a signed logout token, not through the browser.
        end_session = URL(discovery["end_session_endpoint"]).with_query(
            client_id=CLIENT_ID,
            post_logout_redirect_uri=node_stack.gateway + "/oauth2/signed_out")
        await follow_op(browser, str(end_session), node_stack.issuer, {"logout": "yes"})
        async with browser.get(node_stack.gateway + "/echo", allow_redirects=False) as resp:
            assert resp.status == 302  # this browser's session is gone
        async with other.get(node_stack.gateway + "/echo", allow_redirects=False) as resp:
            assert resp.status == 200  # the other browser's OP session (sid) is untouched
    assert "logout kind=backchannel sessions=1" in caplog.text


async def test_tokens_from_oidc_provider_are_refreshed(
        browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    """oidc-provider's own refresh grant (with rotation), driven by a short access token."""
    caplog.set_level(logging.INFO, logger="gateway")
    async with node_gateway(scopes=(*SCOPES, "offline_access"), access_token_ttl=4,
                            session={"refresh_min_interval": "1s"}) as stack:
        await sign_in(browser, stack, "/echo", "alice")
        assert "session_refreshed" not in caplog.text
        await asyncio.sleep(2.5)  # past half of the 4 s token's life: due
        for _ in range(2):
            async with browser.get(stack.gateway + "/echo") as resp:
                assert resp.status == 200
        assert caplog.text.count("session_refreshed sub=alice") == 1


async def test_sixty_second_tokens_under_steady_load_refresh_at_most_once(
        browser: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    """Seen: with 60 s tokens and the default 60 s margin, every request refreshed (1,206
    refresh grants in 10 s). Now a token is due half way through its life."""
    caplog.set_level(logging.INFO, logger="gateway")
    async with node_gateway(scopes=(*SCOPES, "offline_access"),
                            access_token_ttl=60) as stack:
        await sign_in(browser, stack, "/echo", "alice")
        served = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 10

        async def client() -> None:
            nonlocal served
            while loop.time() < end:
                async with browser.get(stack.gateway + "/echo") as resp:
                    assert resp.status == 200
                    await resp.read()
                served += 1

        await asyncio.gather(*(client() for _ in range(5)))
    assert served > 100
    assert caplog.text.count("session_refreshed") <= 1
    assert "access_token_lifetime_short lifetime=60s refresh_margin=60s" in caplog.text


async def test_back_channel_logout_by_sub_ends_every_session_of_that_user_only(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """oidc-provider without backchannel_logout_session_required names only the sub."""
    caplog.set_level(logging.INFO, logger="gateway")
    store = redis_url.rsplit("/", 1)[0] + "/3"  # a database of its own: alice has no others
    async with node_gateway(store=store, backchannel_session_required=False) as stack:
        browsers = [aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                          headers=BROWSER_HEADERS) for _ in range(3)]
        try:
            for browser, user in zip(browsers, ("alice", "alice", "bob"), strict=True):
                await sign_in(browser, stack, "/echo", user)
            end_session = URL(stack.issuer + "/session/end").with_query(
                client_id=CLIENT_ID,
                post_logout_redirect_uri=stack.gateway + "/oauth2/signed_out")
            await follow_op(browsers[0], str(end_session), stack.issuer, {"logout": "yes"})
            statuses = []
            for browser in browsers:
                async with browser.get(stack.gateway + "/echo", allow_redirects=False) as resp:
                    statuses.append(resp.status)
            assert statuses == [302, 302, 200]  # both of alice's sessions, not bob's
            assert "logout kind=backchannel sessions=2" in caplog.text
        finally:
            for browser in browsers:
                await browser.close()
