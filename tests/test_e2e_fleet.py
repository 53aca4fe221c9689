"""End to end: three `gateway run` processes share one real Redis, as a fleet behind a load
balancer. A session made on one works on all, and ending it on one ends it on all at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from conftest import (
    BROWSER_HEADERS,
    CLIENT_ID,
    CLIENT_SECRET,
    free_port,
    gateway_replicas,
    login,
    serve,
)

from gateway.demo.idp import DemoClient, create_idp_app
from gateway.demo.upstream import create_upstream_app

pytestmark = pytest.mark.e2e


class SlowTokenEndpoint:
    """Counts token requests and answers them slowly, so concurrent requests overlap."""

    def __init__(self) -> None:
        self.calls = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/token":
            self.calls += 1
            await asyncio.sleep(0.5)
        return await handler(request)


@pytest.fixture
def token_endpoint() -> SlowTokenEndpoint:
    return SlowTokenEndpoint()


@pytest.fixture
async def fleet(redis_url: str, tmp_path: Path,
                token_endpoint: SlowTokenEndpoint) -> AsyncIterator[list[str]]:
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    idp_port = free_port()
    idp = f"http://127.0.0.1:{idp_port}"
    # Behind a load balancer every replica has the same public URL; here, replica A's.
    client = DemoClient(CLIENT_ID, CLIENT_SECRET, (urls[0] + "/oauth2/callback",), (urls[0] + "/",))
    # Access tokens live 4 s and are refreshed half way through: due 2 s after login.
    idp_app = create_idp_app(idp, [client], access_token_ttl=4)
    idp_app.middlewares.append(token_endpoint.middleware)
    runners = [(await serve(idp_app, idp_port))[0]]
    upstream_runner, upstream = await serve(create_upstream_app())
    runners.append(upstream_runner)
    configs = [{
        "server": {"listen": f"127.0.0.1:{port}", "public_url": urls[0]},
        "oidc": {"issuer": idp, "client_id": CLIENT_ID, "client_secret": "${SECRET}"},
        "session": {"store": redis_url, "refresh_min_interval": "1s"},
        "routes": [{"name": "app", "upstream": upstream}],
    } for port in ports]
    try:
        async with gateway_replicas(configs, tmp_path) as replicas:
            yield replicas
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


async def test_a_session_made_on_one_replica_works_on_all_and_ends_on_all(
        fleet: list[str], browser: aiohttp.ClientSession) -> None:
    first, second, third = fleet
    await login(browser, first, "/echo")
    for url in fleet:
        async with browser.get(url + "/echo") as resp:
            assert resp.status == 200
            headers = {k.lower(): v for k, v in (await resp.json())["headers"]}
            assert headers["x-forwarded-user"] == "alice"
    copied = next(c.value for c in browser.cookie_jar if c.key == "gateway_session")
    async with browser.post(third + "/oauth2/sign_out", headers={"Origin": first},
                            allow_redirects=False) as resp:
        assert resp.status == 302
    async with aiohttp.ClientSession(headers={**BROWSER_HEADERS,
                                              "Accept": "application/json"}) as replay:
        for url in (first, second):
            async with replay.get(url + "/echo",
                                  cookies={"gateway_session": copied}) as resp:
                assert resp.status == 401


async def test_twenty_concurrent_requests_across_the_fleet_refresh_exactly_once(
        fleet: list[str], browser: aiohttp.ClientSession,
        token_endpoint: SlowTokenEndpoint) -> None:
    await login(browser, fleet[0], "/echo")
    assert token_endpoint.calls == 1  # the login's code exchange
    await asyncio.sleep(2.2)  # the access token is now within the refresh margin

    async def status(url: str) -> int:
        async with browser.get(url) as resp:
            return resp.status

    statuses = await asyncio.gather(*(status(fleet[i % 3] + f"/echo/{i}") for i in range(20)))
    assert statuses == [200] * 20
    assert token_endpoint.calls == 2  # exactly one refresh for the whole fleet
