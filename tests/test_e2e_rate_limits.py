"""Per-route rate limits: GCRA in the store, shared by every replica, 429 with Retry-After and
the RateLimit fields past it."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    BROWSER_HEADERS,
    CLIENT_ID,
    CLIENT_SECRET,
    StackFactory,
    free_port,
    gateway_replicas,
    login,
    serve,
)

from gateway.demo.idp import DemoClient, create_idp_app
from gateway.demo.upstream import create_upstream_app

pytestmark = pytest.mark.e2e


def limited(key: str, requests: int = 3, per: str = "1h", **route: Any) -> list[dict[str, Any]]:
    return [{"name": "api", "path_prefix": "/api", "auth": "public",
             "rate_limit": {"requests": requests, "per": per, "key": key}, **route},
            {"name": "app", "path_prefix": "/"}]


async def statuses(http: aiohttp.ClientSession, url: str, n: int,
                   **kw: Any) -> list[int]:
    out = []
    for _ in range(n):
        async with http.get(url, allow_redirects=False, **kw) as resp:
            out.append(resp.status)
    return out


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    return "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")


async def test_past_the_limit_a_client_gets_429_with_retry_after_and_ratelimit_fields(
        make_stack: StackFactory, store: str) -> None:
    stack = await make_stack(store=store, routes=limited("ip"))
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway + "/api/echo") as resp:
            assert resp.status == 200
            assert resp.headers["RateLimit-Policy"] == '"api";q=3;w=3600'
            assert resp.headers["RateLimit"] == '"api";r=2;t=1200'
        assert await statuses(http, stack.gateway + "/api/echo", 3) == [200, 200, 429]
        async with http.get(stack.gateway + "/api/echo",
                            headers={"Accept": "application/json"}) as resp:
            assert resp.status == 429
            assert 1100 < int(resp.headers["Retry-After"]) <= 1200  # the next one: 1h/3
            assert resp.headers["RateLimit"].startswith('"api";r=0;t=')
            assert (await resp.json())["error"] == "rate_limited"
        assert await statuses(http, stack.gateway + "/echo", 5) == [401] * 5  # not limited


async def test_ip_limits_count_the_client_behind_trusted_proxies_separately(
        make_stack: StackFactory) -> None:
    stack = await make_stack(routes=limited("ip", requests=2),
                             server={"trusted_proxies": ["127.0.0.1/32"]})
    async with aiohttp.ClientSession() as http:
        url = stack.gateway + "/api/echo"
        for client in ("203.0.113.1", "203.0.113.2"):
            headers = {"X-Forwarded-For": client}
            assert await statuses(http, url, 3, headers=headers) == [200, 200, 429]
        # IPv6 clients are one bucket per /64
        assert await statuses(http, url, 2, headers={"X-Forwarded-For": "2001:db8::1"}) \
            == [200, 200]
        assert await statuses(http, url, 1, headers={"X-Forwarded-For": "2001:db8::ffff"}) \
            == [429]


async def test_user_limits_count_each_user_and_anonymous_requests_per_address(
        make_stack: StackFactory) -> None:
    stack = await make_stack(routes=[
        {"name": "api", "path_prefix": "/api",
         "rate_limit": {"requests": 2, "per": "1h", "key": "user"}},
        {"name": "pub", "path_prefix": "/pub", "auth": "public",
         "rate_limit": {"requests": 1, "per": "1h", "key": "user"}},
        {"name": "app", "path_prefix": "/"}])
    for user in ("alice", "bob"):
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                         headers=BROWSER_HEADERS) as browser:
            await login(browser, stack.gateway, "/echo", user=user)
            assert await statuses(browser, stack.gateway + "/api/x", 3) == [200, 200, 429]
    async with aiohttp.ClientSession() as anonymous:
        assert await statuses(anonymous, stack.gateway + "/pub/x", 2) == [200, 429]
        # refused before any count: a challenge, never a 429, without a session
        assert await statuses(anonymous, stack.gateway + "/api/x", 3,
                              headers={"Accept": "application/json"}) == [401, 401, 401]


async def test_a_route_limit_is_one_budget_for_three_replicas_on_one_redis(
        redis_url: str, tmp_path: Path) -> None:
    """The budget holds across a fleet: 3 `gateway run` processes on one Redis, 600 requests
    spread over them at once, a limit of 200 per hour: 200 get through, within 5%."""
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    idp_port = free_port()
    idp = f"http://127.0.0.1:{idp_port}"
    client = DemoClient(CLIENT_ID, CLIENT_SECRET, (urls[0] + "/oauth2/callback",))
    runners = [(await serve(create_idp_app(idp, [client]), idp_port))[0]]
    upstream_runner, upstream = await serve(create_upstream_app())
    runners.append(upstream_runner)
    configs = [{
        "server": {"listen": f"127.0.0.1:{port}", "public_url": urls[0]},
        "oidc": {"issuer": idp, "client_id": CLIENT_ID, "client_secret": "${SECRET}"},
        "session": {"store": redis_url},
        "routes": [{"name": "api", "upstream": upstream, "auth": "public",
                    "rate_limit": {"requests": 200, "per": "1h", "key": "route"}}],
    } for port in ports]
    try:
        async with gateway_replicas(configs, tmp_path) as replicas, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=60)) as http:

            async def one(n: int) -> int:
                async with http.get(replicas[n % 3] + "/echo") as resp:
                    await resp.read()
                    return resp.status

            results = Counter(await asyncio.gather(*(one(n) for n in range(600))))
        assert set(results) <= {200, 429}, results
        assert 190 <= results[200] <= 210, results  # 200 within 5%
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
