"""Shared fixtures: a real redis-server, the demo IdP and upstream on real sockets, gateways.

End-to-end fixtures bind to 127.0.0.1 on free ports and are torn down after each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import html.parser
import os
import shutil
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.typedefs import Middleware
from ports import free_port
from redis_servers import start_plain
from yarl import URL

from gateway import config as config_module
from gateway.app import build_app
from gateway.config_routes import RouteConfig
from gateway.demo.idp import DemoClient, create_idp_app
from gateway.demo.upstream import create_upstream_app
from gateway.routing import Route, RouteTable
from gateway.server import GatewayRunner
from gateway.upstreams import Upstream

CLIENT_ID = "gateway-test"
CLIENT_SECRET = "test-secret-" + "s" * 32
BROWSER_HEADERS = {"Accept": "text/html,application/xhtml+xml"}
CHROMIUM = "/usr/bin/chromium"
# Without these flags Chromium tries to reach Google services, which this sandbox refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def unpooled_upstream(rc: RouteConfig) -> Upstream:
    """The route's upstream without a client session, for tests that never send anything
    (routing, policy, headers, the boundary check only read its base URL)."""
    return Upstream.at(cast(aiohttp.ClientSession, None), rc.upstream, True, rc)


def built_route(rc: RouteConfig) -> Route:
    """A route as the app builds it, minus the connection pool."""
    return Route.build(rc, unpooled_upstream(rc))


def route_table(configs: Iterable[RouteConfig]) -> RouteTable:
    return RouteTable.build(configs, unpooled_upstream)


@dataclass
class FakeClock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of our own on a free port; never a server we did not start."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (CI installs it)")
    deployment = start_plain(tmp_path_factory.mktemp("redis"))
    yield deployment.url
    deployment.stop()


async def serve(app: web.Application, port: int | None = None, *,
                runner_class: type[web.AppRunner] = web.AppRunner) -> tuple[web.AppRunner, str]:
    runner = runner_class(app, access_log=None)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def wait_until_ready(url: str, *, attempts: int = 150, status: int = 200) -> None:
    """Poll `url` (a readiness endpoint) every 0.1 s until it answers `status`."""
    async with aiohttp.ClientSession() as http:
        for _ in range(attempts):
            try:
                async with http.get(url) as resp:
                    if resp.status == status:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer {status}")


GATEWAY_ENV = {"SECRET": CLIENT_SECRET, "PATH": "/usr/bin:/bin"}


def _write_yaml(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))


async def start_gateway(config: dict[str, Any], path: Path, *, log: Path | None = None,
                        env: Mapping[str, str] = GATEWAY_ENV) -> asyncio.subprocess.Process:
    """`gateway run` on `config`, written as YAML to `path` (the client secret from $SECRET);
    its log to the file `log` (a pipe nobody reads would fill up and block it) or nowhere."""
    _write_yaml(path, config)
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("wb")) if log is not None \
            else asyncio.subprocess.DEVNULL
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(path), env=dict(env),
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr)


@contextlib.asynccontextmanager
async def gateway_replicas(configs: Sequence[dict[str, Any]], tmp_path: Path
                           ) -> AsyncIterator[list[str]]:
    """`gateway run` processes, one per config (written as YAML, the client secret from
    $SECRET), ready when yielded (their listen URLs); stopped by SIGTERM, cleanly, after."""
    processes = []
    try:
        for index, config in enumerate(configs):
            processes.append(await start_gateway(config, tmp_path / f"replica-{index}.yaml"))
        urls = ["http://" + config["server"]["listen"] for config in configs]
        for url in urls:
            await wait_until_ready(url + "/oauth2/readyz")
        yield urls
    finally:
        for proc in processes:
            proc.terminate()
        for proc in processes:
            assert await asyncio.wait_for(proc.wait(), timeout=15) == 0


@contextlib.asynccontextmanager
async def idp_and_upstream(public_url: str) -> AsyncIterator[tuple[str, str]]:
    """The demo IdP, with the test client registered for a gateway at `public_url` (its
    callback; its signed-out page and `/` after a sign-out), and the demo upstream, on real
    sockets while the context lasts: (issuer, upstream URL)."""
    idp_port = free_port()
    idp = f"http://127.0.0.1:{idp_port}"
    client = DemoClient(CLIENT_ID, CLIENT_SECRET, (public_url + "/oauth2/callback",),
                        (public_url + "/oauth2/signed_out", public_url + "/"))
    idp_runner, _ = await serve(create_idp_app(idp, [client]), idp_port)
    upstream_runner, upstream = await serve(create_upstream_app())
    try:
        yield idp, upstream
    finally:
        await upstream_runner.cleanup()
        await idp_runner.cleanup()


def raw_config(public_url: str, issuer: str, upstream: str, *, store: str = "memory://",
               routes: list[dict[str, Any]] | None = None, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "server": {"listen": public_url.removeprefix("http://"), "public_url": public_url},
        "oidc": {"issuer": issuer, "client_id": CLIENT_ID, "client_secret": "${SECRET}",
                 "scopes": ["openid", "email", "profile"], "timeout": "3s"},
        "session": {"store": store},
        "routes": routes or [
            {"name": "admin", "path_prefix": "/admin", "upstream": upstream,
             "allow": {"groups": ["admins"]}},
            {"name": "public", "path_prefix": "/public", "upstream": upstream,
             "auth": "public"},
            {"name": "app", "path_prefix": "/", "upstream": upstream},
        ],
    }
    for route in raw["routes"]:
        route.setdefault("upstream", upstream)  # tests name only what differs
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


@dataclass
class Stack:
    """An IdP, an upstream and a gateway, all on real sockets."""

    gateway: str
    idp: str
    upstream: str
    idp_app: web.Application
    config: config_module.Config
    runners: list[web.AppRunner]


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack() -> AsyncIterator[StackFactory]:
    runners: list[web.AppRunner] = []

    async def make(*, store: str = "memory://", userinfo_only_claims: bool = False,
                   routes: list[dict[str, Any]] | None = None,
                   idp_middlewares: Sequence[Middleware] = (),
                   access_token_ttl: int = 3600,
                   clock: Callable[[], float] = time.time, **sections: Any) -> Stack:
        gw_port, idp_port = free_port(), free_port()
        gateway, idp = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{idp_port}"
        client = DemoClient(CLIENT_ID, CLIENT_SECRET, (gateway + "/oauth2/callback",),
                            (gateway + "/oauth2/signed_out",))
        idp_app = create_idp_app(idp, [client], userinfo_only_claims=userinfo_only_claims,
                                 clock=clock, access_token_ttl=access_token_ttl)
        idp_app.middlewares.extend(idp_middlewares)  # tests make the IdP misbehave with these
        runner, _ = await serve(idp_app, idp_port)
        runners.append(runner)
        runner, upstream = await serve(create_upstream_app())
        runners.append(runner)
        raw = raw_config(gateway, idp, upstream, store=store, routes=routes, **sections)
        config = config_module.parse(raw, {"SECRET": CLIENT_SECRET})
        runner, _ = await serve(build_app(config, clock=clock), gw_port, runner_class=GatewayRunner)
        runners.append(runner)
        return Stack(gateway, idp, upstream, idp_app, config, list(runners))

    yield make
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def browser() -> AsyncIterator[aiohttp.ClientSession]:
    """A cookie-keeping HTTP client that follows no redirects by itself."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     headers=BROWSER_HEADERS) as session:
        yield session


class _FormParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = values.get("action") or ""
        if tag == "input" and values.get("type") == "hidden" and values.get("name"):
            self.fields[values["name"] or ""] = values.get("value") or ""


async def idp_sign_in(browser: aiohttp.ClientSession, authorize_url: str, user: str,
                      password: str | None = None) -> str:
    """Fill the demo IdP's login form; returns where the IdP sends the browser back."""
    async with browser.get(authorize_url, allow_redirects=False) as resp:
        if resp.status == 302:  # the IdP remembered the user
            return resp.headers["Location"]
        assert resp.status == 200, await resp.text()
        parser = _FormParser()
        parser.feed(await resp.text())
    form = {**parser.fields, "username": user, "password": password or user}
    action = URL(authorize_url).join(URL(parser.action or "/authorize"))
    async with browser.post(action, data=form, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        return resp.headers["Location"]


async def login(browser: aiohttp.ClientSession, gateway: str, path: str = "/",
                user: str = "alice") -> aiohttp.ClientResponse:
    """Browse to `path`, sign in at the IdP, follow the callback; returns the final response."""
    async with browser.get(gateway + path, allow_redirects=False) as resp:
        assert resp.status == 302, f"expected a login redirect, got {resp.status}"
        authorize = resp.headers["Location"]
    callback = await idp_sign_in(browser, authorize, user)
    async with browser.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        target = resp.headers["Location"]
    assert target == path, f"landed on {target!r}, not {path!r}"
    resp = await browser.get(gateway + target, allow_redirects=False)
    await resp.read()
    return resp


async def chromium_sign_in(page: Any, url: str, user: str = "alice") -> None:
    """Open `url` in a real Chromium page (a playwright Page) and sign in as `user` at the
    demo IdP's form it is sent to (the password is the user's name)."""
    from playwright.async_api import expect

    await page.goto(url)
    await expect(page.locator("#username")).to_be_visible()
    await page.fill("#username", user)
    await page.fill("#password", user)
    await page.click("#sign-in")


def _chromium_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (CI installs Debian's chromium)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "python playwright is not installed"
    return None


@pytest.fixture
async def page() -> AsyncIterator[object]:
    """A fresh page in a real headless Chromium (a playwright Page; typed loosely so the
    suite imports without playwright). Skipped, with the reason, where Chromium is missing."""
    reason = _chromium_missing()
    if reason:
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            yield await context.new_page()
        finally:
            await browser.close()
