"""End to end: two gateways of two different apps (two clients of one IdP) share one real Redis,
as sidecars do. Neither accepts the other's sessions, and a logout meant for one app's user
leaves the other app's session of that same user alone."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import BROWSER_HEADERS, free_port, login, serve, wait_until_ready
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.demo.idp import STATE, DemoClient, create_idp_app
from gateway.demo.upstream import create_upstream_app

pytestmark = pytest.mark.e2e

SECRETS = {"app-a": "secret-a-" + "a" * 32, "app-b": "secret-b-" + "b" * 32}
EVENT = {"http://schemas.openid.net/event/backchannel-logout": {}}


@dataclass
class Apps:
    idp: str
    key: RSAKey
    urls: dict[str, str]  # client_id -> gateway URL


@pytest.fixture
async def apps(redis_url: str, tmp_path: Path) -> AsyncIterator[Apps]:
    urls = {client_id: f"http://127.0.0.1:{free_port()}" for client_id in SECRETS}
    idp_port = free_port()
    idp = f"http://127.0.0.1:{idp_port}"
    clients = [DemoClient(client_id, secret, (urls[client_id] + "/oauth2/callback",))
               for client_id, secret in SECRETS.items()]
    idp_app = create_idp_app(idp, clients)
    runners = [(await serve(idp_app, idp_port))[0]]
    upstream_runner, upstream = await serve(create_upstream_app())
    runners.append(upstream_runner)
    processes = []
    for client_id, url in urls.items():
        config = {
            "server": {"listen": url.removeprefix("http://"), "public_url": url},
            "oidc": {"issuer": idp, "client_id": client_id, "client_secret": "${SECRET}"},
            "session": {"store": redis_url},  # one Redis, no key_prefix: the default namespaces
            "routes": [{"name": "app", "upstream": upstream}],
        }
        path = tmp_path / f"{client_id}.yaml"
        path.write_text(yaml.safe_dump(config))
        processes.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(path),
            env={"SECRET": SECRETS[client_id], "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
    try:
        for url in urls.values():
            await wait_until_ready(url + "/oauth2/readyz")
        yield Apps(idp, idp_app[STATE].key, urls)
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            assert await asyncio.wait_for(proc.wait(), timeout=15) == 0
        for runner in reversed(runners):
            await runner.cleanup()


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                 headers=BROWSER_HEADERS)


def cookie_of(session: aiohttp.ClientSession) -> str:
    return next(c.value for c in session.cookie_jar if c.key == "gateway_session")


async def user_with(cookie: str, url: str) -> str | int:
    """Who `url`'s gateway says the cookie belongs to, or the status it refused it with."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/echo", cookies={"gateway_session": cookie},
                            headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                return resp.status
            return dict((await resp.json())["headers"])["X-Forwarded-User"]


async def test_a_cookie_from_one_app_is_refused_by_the_other_on_the_same_redis(
        apps: Apps) -> None:
    """Reproduced before: app B accepted app A's cookie and sent X-Forwarded-User upstream,
    so a user the IdP lets into A got into B by copying a cookie."""
    async with browser() as alice_at_a:
        await login(alice_at_a, apps.urls["app-a"], "/echo")
        cookie = cookie_of(alice_at_a)
    assert await user_with(cookie, apps.urls["app-a"]) == "alice"
    assert await user_with(cookie, apps.urls["app-b"]) == 401


async def test_a_back_channel_logout_for_one_apps_user_leaves_the_other_app_alone(
        apps: Apps) -> None:
    cookies = {}
    for client_id, url in apps.urls.items():
        async with browser() as alice:
            await login(alice, url, "/echo")
            cookies[client_id] = cookie_of(alice)
    now = int(time.time())
    claims = {"iss": apps.idp, "aud": "app-a", "sub": "alice", "iat": now, "exp": now + 120,
              "jti": secrets.token_hex(8), "events": EVENT}  # no sid: every session of alice
    token = jwt.encode({"alg": "RS256", "kid": apps.key.kid, "typ": "logout+jwt"}, claims,
                       apps.key)
    async with aiohttp.ClientSession() as http:
        async with http.post(apps.urls["app-a"] + "/oauth2/backchannel_logout",
                             data={"logout_token": token}) as resp:
            assert resp.status == 200
    assert await user_with(cookies["app-a"], apps.urls["app-a"]) == 401
    assert await user_with(cookies["app-b"], apps.urls["app-b"]) == "alice"
