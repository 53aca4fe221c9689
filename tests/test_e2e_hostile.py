"""End to end: hostile cookies, states and paths get nowhere, and never a 500."""

from __future__ import annotations

import base64

import aiohttp
import pytest
from conftest import BROWSER_HEADERS, Stack, StackFactory, login
from yarl import URL

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


def tampered(cookie: str) -> list[str]:
    head, _, tail = cookie.partition(".")
    flipped = tail[:-2] + ("A" if tail[-2] != "A" else "B") + tail[-1]
    return [
        "", "x", cookie[:-1], cookie + "x", cookie + "." + tail, head, "." + tail,
        f"{head}.{flipped}",  # right id, wrong key
        f"{flipped}.{tail}",  # wrong id, right key
        base64.b64encode(b"\x00" * 64).decode(), "A" * 4096, "%00%ff", "../../etc/passwd",
        "a" * 43 + "." + "b" * 43,
    ]


async def test_malformed_or_tampered_session_cookies_are_no_session(
        stack: Stack, browser: aiohttp.ClientSession) -> None:
    """Cookie tampering: never someone else's session, never a 500."""
    await login(browser, stack.gateway, "/echo")
    real = next(c.value for c in browser.cookie_jar if c.key == "gateway_session")
    async with aiohttp.ClientSession() as http:
        for value in tampered(real):
            for accept, expected in (("application/json", 401), (BROWSER_HEADERS["Accept"], 302)):
                async with http.get(stack.gateway + "/echo", allow_redirects=False,
                                    headers={"Accept": accept,
                                             "Cookie": f"gateway_session={value}"}) as resp:
                    assert resp.status == expected, (value[:40], resp.status)


@pytest.mark.parametrize("state", [
    "", "x", "A" * 300, "%00", "../..", "state with spaces", "\u00e9t\u00e9",
])
async def test_malformed_state_values_are_a_clean_login_error(
        stack: Stack, state: str) -> None:
    async with aiohttp.ClientSession() as http:
        url = URL(stack.gateway + "/oauth2/callback").with_query(state=state, code="c")
        async with http.get(url, headers={"Accept": "application/json"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "login_failed"


@pytest.mark.parametrize("raw_path", [
    "/public/../admin/x", "/public/%2e%2e/admin/x", "/public/%2E%2e/admin/x",
    "/public/..%2fadmin/x", "/public%2f..%2fadmin/x", "/public/%252e%252e/admin/x",
    "/public/..;/admin/x", "/public/..\\admin/x", "/public/%5c../admin/x",
    "/public/%00/../admin/x", "/./admin/x", "//admin/x", "/admin;jsessionid=1/x",
    "/ADMIN/x", "/public/" + "a/../" * 2000 + "admin/x",
])
async def test_no_path_trick_reaches_admin_under_the_public_policy(
        stack: Stack, raw_path: str) -> None:
    """Path confusion: the public route's policy never applies to an admin path."""
    async with aiohttp.ClientSession() as http:
        async with http.get(URL(stack.gateway + raw_path, encoded=True),
                            headers={"Accept": "application/json"},
                            allow_redirects=False) as resp:
            body = await resp.text()
            if resp.status == 200:  # only acceptable when the upstream saw a non-admin path
                path = (await resp.json())["path"] if '"path"' in body else ""
                assert not path.lower().startswith(("/admin", "/public/../admin")), path
                assert "..;" not in path and "/../" not in path, path
            else:
                assert resp.status in (400, 401, 404, 414), (raw_path, resp.status)


async def test_case_insensitive_route_keeps_its_policy_for_every_spelling(
        make_stack: StackFactory, browser: aiohttp.ClientSession) -> None:
    """IIS-style upstream: /ADMIN is /admin there, so it must be /admin's policy here too."""
    probe = await make_stack()
    stack = await make_stack(routes=[
        {"name": "admin", "path_prefix": "/admin", "upstream": probe.upstream,
         "case_insensitive": True, "allow": {"groups": ["admins"]}},
        {"name": "public", "path_prefix": "/", "upstream": probe.upstream, "auth": "public"},
    ])
    async with aiohttp.ClientSession() as anonymous:
        for path in ("/admin/echo", "/ADMIN/echo", "/Admin;x=1/echo", "/%41dmin/echo"):
            async with anonymous.get(URL(stack.gateway + path, encoded=True),
                                     headers={"Accept": "application/json"}) as resp:
                assert resp.status == 401, path
    await login(browser, stack.gateway, "/ADMIN/echo", user="alice")  # alice is an admin
    async with browser.get(stack.gateway + "/AdMiN/x", allow_redirects=False) as resp:
        assert resp.status == 200  # proxied, as the user asked for it
