"""Forward-auth behind a real nginx (Debian's), configured by the shipped
deploy/forward-auth/nginx.conf: nginx serves the app and asks /oauth2/auth about each request.

nginx connects from 127.0.0.2 (proxy_bind), the one address in trusted_proxies, so the test
client, on 127.0.0.1, is an untrusted caller when it goes to the gateway directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from conftest import (
    BROWSER_HEADERS,
    CLIENT_SECRET,
    idp_and_upstream,
    idp_sign_in,
    raw_config,
    serve,
)
from ports import free_port
from real_upstreams import start_nginx_site
from yarl import URL

from gateway import config as config_module
from gateway.app import build_app

pytestmark = pytest.mark.e2e

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "forward-auth" / "nginx.conf"
FRONT_ADDRESS = "127.0.0.2"


@dataclass
class Site:
    front: str  # nginx: what browsers use
    gateway: str  # the gateway itself, which only nginx should call


def site_conf(front_port: int, gateway_port: int, app_port: int) -> str:
    """The shipped config, pointed at this test's ports, with nginx connecting from
    FRONT_ADDRESS."""
    text = SHIPPED.read_text()
    for old, new in (("server 127.0.0.1:4180;", f"server 127.0.0.1:{gateway_port};"),
                     ("server 127.0.0.1:8080;", f"server 127.0.0.1:{app_port};"),
                     ("listen 80;", f"listen 127.0.0.1:{front_port};")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return f"proxy_bind {FRONT_ADDRESS};\n{text}"


@contextlib.asynccontextmanager
async def nginx(tmp_path: Path, port: int, conf: str) -> AsyncIterator[None]:
    # In a thread: its readiness probe goes through to the gateway, in this event loop.
    server = await asyncio.to_thread(start_nginx_site, tmp_path, port, conf)
    try:
        yield
    finally:
        await asyncio.to_thread(server.stop)


@contextlib.asynccontextmanager
async def forward_auth_site(tmp_path: Path, **routes_and_sections: Any
                            ) -> AsyncIterator[Site]:
    front_port, gateway_port = free_port(), free_port()
    front = f"http://127.0.0.1:{front_port}"
    async with idp_and_upstream(front) as (idp, app):
        raw = raw_config(front, idp, app, routes=[
            {"name": "admin", "path_prefix": "/echo/admin", "allow": {"groups": ["admins"]}},
            {"name": "public", "path_prefix": "/public", "auth": "public"},
            {"name": "app", "path_prefix": "/"},
        ], server={"listen": f"127.0.0.1:{gateway_port}", "trusted_proxies": [FRONT_ADDRESS]},
            **routes_and_sections)
        config = config_module.parse(raw, {"SECRET": CLIENT_SECRET})
        gateway_runner, gateway = await serve(build_app(config), gateway_port)
        try:
            async with nginx(tmp_path, front_port, site_conf(front_port, gateway_port,
                                                             int(URL(app).port or 0))):
                yield Site(front, gateway)
        finally:
            await gateway_runner.cleanup()


async def sign_in_through_nginx(browser: aiohttp.ClientSession, site: Site, path: str,
                                user: str) -> None:
    async with browser.get(site.front + path, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        start = resp.headers["Location"]
    assert start == f"{site.front}/oauth2/start?rd={quote(path, safe='')}"
    async with browser.get(start, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        authorize = resp.headers["Location"]
    callback = await idp_sign_in(browser, authorize, user)
    assert callback.startswith(site.front + "/oauth2/callback?")
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        assert resp.headers["Location"] == path


def echoed(body: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in body["headers"]}


async def test_browser_signs_in_through_nginx_and_reaches_the_app_as_itself(
        tmp_path: Path, browser: aiohttp.ClientSession) -> None:
    async with forward_auth_site(tmp_path) as site:
        await sign_in_through_nginx(browser, site, "/echo/x?q=1", "alice")
        async with browser.get(site.front + "/echo/x?q=1",
                               headers={"X-Forwarded-User": "mallory",
                                        "X-Auth-Request-User": "mallory"}) as resp:
            assert resp.status == 200
            body = await resp.json()
        sent = echoed(body)
        assert (body["path"], body["query"]) == ("/echo/x", "q=1")
        assert sent["x-forwarded-user"] == "alice"
        assert sent["x-forwarded-email"] == "alice@example.com"
        assert sent["x-forwarded-groups"] == "admins,staff"
        assert "x-auth-request-user" not in sent
        async with browser.get(site.front + "/echo/admin/") as resp:
            assert resp.status == 200


async def test_policy_refusals_and_api_clients_through_nginx(
        tmp_path: Path, browser: aiohttp.ClientSession) -> None:
    async with forward_auth_site(tmp_path) as site:
        async with aiohttp.ClientSession() as api, api.get(site.front + "/echo/x") as resp:
            assert resp.status == 401  # an API client keeps its 401
        async with aiohttp.ClientSession() as api, api.get(
                site.front + "/public/echo", headers={"X-Forwarded-User": "mallory"}) as resp:
            assert resp.status == 200  # a public route: let through, with no identity
            assert "x-forwarded-user" not in echoed(await resp.json())
        await sign_in_through_nginx(browser, site, "/echo/y", "bob")
        async with browser.get(site.front + "/echo/admin/") as resp:
            assert resp.status == 403


@pytest.mark.parametrize("spoof", [
    {"X-Forwarded-Uri": "/public/x"},
    {"X-Original-URI": "/public/x"},
    {"X-Forwarded-Uri": "/public/x", "X-Original-URI": "/public/x",
     "X-Forwarded-Method": "OPTIONS", "X-Forwarded-Host": "elsewhere.example"},
])
async def test_a_spoofed_description_through_nginx_changes_nothing(
        tmp_path: Path, browser: aiohttp.ClientSession, spoof: dict[str, str]) -> None:
    async with forward_auth_site(tmp_path) as site:
        async with aiohttp.ClientSession(headers=BROWSER_HEADERS) as stranger, \
                stranger.get(site.front + "/echo/x", headers=spoof,
                             allow_redirects=False) as resp:
            assert resp.status == 302  # still sent to sign in
            assert "/oauth2/start?rd=%2Fecho%2Fx" in resp.headers["Location"]
        await sign_in_through_nginx(browser, site, "/echo/y", "bob")
        async with browser.get(site.front + "/echo/admin/", headers=spoof) as resp:
            assert resp.status == 403  # bob is still refused


async def test_the_gateway_believes_no_description_from_an_untrusted_caller(
        tmp_path: Path, browser: aiohttp.ClientSession) -> None:
    async with forward_auth_site(tmp_path) as site:
        await sign_in_through_nginx(browser, site, "/echo/y", "bob")
        cookie = {c.key: c.value for c in browser.cookie_jar}["gateway_session"]
        async with aiohttp.ClientSession() as direct:
            for path, description in (("/oauth2/auth", {"X-Forwarded-Uri": "/public/x"}),
                                      ("/oauth2/auth/public/x", {})):
                async with direct.get(site.gateway + path, headers={
                        **description, "Cookie": f"gateway_session={cookie}"}) as resp:
                    assert resp.status == 403
                    assert "X-Auth-Request-User" not in resp.headers


async def test_forward_auth_answers_and_their_headers(tmp_path: Path,
                                                      browser: aiohttp.ClientSession) -> None:
    """What nginx is told, asked the way nginx asks (from the trusted address)."""
    async with forward_auth_site(tmp_path) as site:
        await sign_in_through_nginx(browser, site, "/echo/y", "bob")
        cookie = {c.key: c.value for c in browser.cookie_jar}["gateway_session"]
        connector = aiohttp.TCPConnector(local_addr=(FRONT_ADDRESS, 0))
        async with aiohttp.ClientSession(connector=connector) as front:
            async def ask(uri: str, **extra: str) -> aiohttp.ClientResponse:
                async with front.get(site.gateway + "/oauth2/auth", headers={
                        "X-Forwarded-Uri": uri, "Cookie": f"gateway_session={cookie}",
                        "X-Forwarded-Host": URL(site.front).raw_authority, **extra}) as resp:
                    await resp.read()
                    return resp
            resp = await ask("/echo/y")
            assert resp.status == 202
            assert resp.headers["X-Auth-Request-User"] == "bob"
            assert resp.headers["X-Auth-Request-Groups"] == "staff"
            assert resp.headers["Cache-Control"] == "no-store"
            assert (await ask("/echo/admin/")).status == 403
            assert (await ask("/public/x")).status == 202
            # The same canonical form and refusals as a direct request.
            assert (await ask("/public/../echo/admin/")).status == 403
            assert (await ask("/public/%2e%2e/echo/admin/")).status == 403
            assert (await ask("/public%2F..%2Fecho/admin/")).status == 403
            # Ambiguous descriptions are refused, not guessed at.
            assert (await ask("/public/x", **{"X-Original-URI": "/echo/admin/"})).status == 403
            resp = await ask("/echo/y", Cookie="", Accept="text/html")
            assert resp.status == 401
            assert resp.headers["X-Auth-Request-Sign-In"] == \
                f"{site.front}/oauth2/start?rd=%2Fecho%2Fy"
            assert re.search(r'<meta http-equiv="refresh" content="0; url=[^"]+/oauth2/start',
                             await resp.text())
