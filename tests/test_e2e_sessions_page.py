"""/oauth2/sessions: a user's own sessions across two replicas on one real Redis, ended from
either one; two users never see or reach each other's; the CSRF checks; and a real Chromium
ending one browser's session from another."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from conftest import (
    BROWSER_HEADERS,
    CLIENT_SECRET,
    chromium_sign_in,
    free_port,
    idp_and_upstream,
    login,
    raw_config,
    serve,
)

from gateway import config as config_module
from gateway.app import build_app
from gateway.server import GatewayRunner

pytestmark = pytest.mark.e2e

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0"
CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/130.0.0.0 Safari/537.36")
JSON = {"Accept": "application/json"}


@dataclass
class Pair:
    a: str  # the public URL: replica A's
    b: str  # replica B, with session.cache_ttl 1s


@contextlib.asynccontextmanager
async def two_replicas(redis_url: str) -> AsyncIterator[Pair]:
    port_a, port_b = free_port(), free_port()
    a, b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    async with idp_and_upstream(a) as (idp, upstream):
        runners = []
        try:
            for port, cache in ((port_a, "0s"), (port_b, "1s")):
                raw = raw_config(a, idp, upstream, store=redis_url,
                                 session={"cache_ttl": cache})
                raw["server"]["listen"] = f"127.0.0.1:{port}"
                config = config_module.parse(raw, {"SECRET": CLIENT_SECRET})
                runner, _ = await serve(build_app(config), port, runner_class=GatewayRunner)
                runners.append(runner)
            yield Pair(a, b)
        finally:
            for runner in runners:
                await runner.cleanup()


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[Pair]:
    async with two_replicas(redis_url) as replicas:
        yield replicas


@contextlib.asynccontextmanager
async def signed_in(pair: Pair, user: str, agent: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers={**BROWSER_HEADERS, "User-Agent": agent}) as http:
        await login(http, pair.a, "/echo", user=user)
        yield http


async def listing(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/oauth2/sessions", headers=JSON) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        return dict(await resp.json())


async def end(http: aiohttp.ClientSession, url: str, which: str, token: str | None, *,
              origin: str) -> aiohttp.ClientResponse:
    form = {"end": which, **({"csrf": token} if token is not None else {})}
    resp = await http.post(url + "/oauth2/sessions", data=form, allow_redirects=False,
                           headers={**JSON, "Origin": origin})
    await resp.read()
    return resp


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/echo", headers=JSON, allow_redirects=False) as resp:
        return resp.status


async def test_a_user_lists_and_ends_their_own_sessions_on_any_replica(pair: Pair) -> None:
    async with signed_in(pair, "alice", FIREFOX) as laptop, \
            signed_in(pair, "alice", CHROME) as desktop, \
            signed_in(pair, "bob", FIREFOX) as bobs:
        mine = await listing(laptop, pair.b)  # the other replica sees the fleet's sessions
        assert [(s["current"], s["device"], s["client_ip"]) for s in mine["sessions"]] == [
            (True, "Firefox on Linux", "127.0.0.1"), (False, "Chrome on Windows", "127.0.0.1")]
        assert all(s["signed_in"].endswith("UTC") and s["last_used"].endswith("UTC")
                   for s in mine["sessions"])
        desktop_id = mine["sessions"][1]["id"]
        assert (await status_of(desktop, pair.b)) == 200  # cached on B from now on
        # bob sees his one session only, and cannot end alice's, whatever he sends
        bob = await listing(bobs, pair.a)
        assert [s["device"] for s in bob["sessions"]] == ["Firefox on Linux"]
        assert desktop_id not in str(bob)
        refused = await end(bobs, pair.a, desktop_id, bob["csrf_token"], origin=pair.a)
        assert refused.status == 404
        assert (await status_of(desktop, pair.a)) == 200
        # alice, on replica B, ends her desktop's session: refused at once on A, and on B
        # (which had it cached for 1 s) within 1 s
        ended = await end(laptop, pair.b, desktop_id, mine["csrf_token"], origin=pair.a)
        assert ended.status == 200 and await ended.json() == {"ended": 1}
        assert (await status_of(desktop, pair.a)) == 401
        started = time.monotonic()
        while (await status_of(desktop, pair.b)) != 401:
            assert time.monotonic() - started < 1.2
            await asyncio.sleep(0.05)
        assert (await status_of(laptop, pair.a), await status_of(bobs, pair.a)) == (200, 200)
        assert [s["device"] for s in (await listing(laptop, pair.a))["sessions"]] == [
            "Firefox on Linux"]


async def test_ending_all_others_keeps_the_current_session(pair: Pair) -> None:
    async with signed_in(pair, "alice", FIREFOX) as laptop, \
            signed_in(pair, "alice", CHROME) as desktop, \
            signed_in(pair, "alice", "curl/8.0") as script:
        token = (await listing(laptop, pair.a))["csrf_token"]
        ended = await end(laptop, pair.a, "others", token, origin=pair.a)
        assert await ended.json() == {"ended": 2}
        assert [await status_of(h, pair.a) for h in (laptop, desktop, script)] == [200, 401, 401]


async def test_the_form_is_refused_without_our_origin_or_this_sessions_token(
        pair: Pair) -> None:
    async with signed_in(pair, "alice", FIREFOX) as laptop, \
            signed_in(pair, "alice", CHROME) as desktop:
        mine, theirs = await listing(laptop, pair.a), await listing(desktop, pair.a)
        other = mine["sessions"][1]["id"]
        assert mine["csrf_token"] != theirs["csrf_token"]
        for token, origin in ((None, pair.a), ("0" * 64, pair.a),
                              (theirs["csrf_token"], pair.a),  # another session's token
                              (mine["csrf_token"], "http://evil.example")):
            assert (await end(laptop, pair.a, other, token, origin=origin)).status == 403
        assert (await end(laptop, pair.a, "<script>", mine["csrf_token"],
                          origin=pair.a)).status == 400
        assert (await status_of(desktop, pair.a)) == 200  # nothing was ended


async def test_without_a_session_browsers_sign_in_first_and_api_clients_get_401(
        pair: Pair) -> None:
    async with aiohttp.ClientSession(headers=BROWSER_HEADERS) as http:
        async with http.get(pair.a + "/oauth2/sessions", allow_redirects=False) as resp:
            assert resp.status == 302  # to the IdP, coming back to the page
        async with http.get(pair.a + "/oauth2/sessions", headers=JSON) as resp:
            assert resp.status == 401
        assert (await end(http, pair.a, "others", "x", origin=pair.a)).status == 401


async def test_the_page_shows_what_a_browser_said_escaped(pair: Pair) -> None:
    async with signed_in(pair, "alice", '<script>alert(1)</script> "Firefox/1"') as http:
        async with http.get(pair.a + "/oauth2/sessions") as resp:
            page = await resp.text()
            assert resp.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "this session" in page


@pytest.mark.browser
async def test_in_chromium_one_browser_ends_the_others_session(page: object,
                                                                redis_url: str) -> None:
    from playwright.async_api import Page, expect

    assert isinstance(page, Page)
    browser = page.context.browser
    assert browser is not None
    async with two_replicas(redis_url) as replicas:
        other = await (await browser.new_context()).new_page()
        for tab in (page, other):
            await chromium_sign_in(tab, replicas.a + "/echo")
            await expect(tab.locator("body")).to_contain_text("X-Forwarded-User")
        await page.goto(replicas.a + "/oauth2/sessions")
        rows = page.locator("tbody tr")
        await expect(rows).to_have_count(2)
        await expect(rows.first).to_contain_text("this session")
        await rows.nth(1).get_by_role("button", name="End this session").click()
        await expect(page.locator("tbody tr")).to_have_count(1)
        # the other browser's cookie names no session any more (a page load would sign it in
        # again at once: the IdP remembers alice)
        refused = await other.context.request.get(replicas.a + "/oauth2/userinfo",
                                                  headers={"Accept": "application/json"})
        assert refused.status == 401
        await page.goto(replicas.a + "/echo")
        await expect(page.locator("body")).to_contain_text("X-Forwarded-User")
