"""`gateway check-config --online`: what a valid config points at, checked for real.

Offline, check-config can only say the file is well formed. Online it also asks the IdP for
its discovery document and keys, pings the session store, and sends each route's upstream a
GET, then prints a table of the routes with who may use them and what their upstream said.
Any HTTP answer from an upstream counts as reachable (a 404 at "/" is an app without a home
page); a refused connection, a TLS failure or silence does not. Nothing is written anywhere.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from gateway.config import Config
from gateway.config_routes import RouteConfig
from gateway.errors import GatewayError
from gateway.oidc.provider import Provider
from gateway.sessions.backends import open_backend
from gateway.upstreams import Upstreams


async def check(config: Config) -> tuple[str, bool]:
    """The report, and whether everything answered."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        idp = await _idp(http, config)
    store = await _store(config)
    upstreams = Upstreams()
    try:
        reached = await asyncio.gather(*(_upstream(upstreams, route)
                                         for route in config.routes))
    finally:
        await upstreams.aclose()
    lines = [f"idp    {idp[1]}", f"store  {store[1]}", "", _table(config, reached)]
    healthy = idp[0] and store[0] and all(ok for ok, _ in reached)
    return "\n".join(lines), healthy


async def _idp(http: aiohttp.ClientSession, config: Config) -> tuple[bool, str]:
    provider = Provider(http, config.oidc.issuer, timeout=config.oidc.timeout, clock=time.time)
    try:
        metadata = await provider.metadata()
        keys = await provider.keys(None, trusted=True)
    except GatewayError as exc:
        return False, f"FAIL {config.oidc.issuer}: {exc.detail}"
    return True, (f"ok   {metadata.issuer} ({len(keys.keys)} signing key(s); "
                  f"introspection {'offered' if metadata.introspection_endpoint else 'none'})")


async def _store(config: Config) -> tuple[bool, str]:
    where = config.session.store_location.kind
    if where == "memory":
        return True, "ok   memory:// (in this process only)"
    backend = open_backend(config.session, clock=time.time)
    try:
        await backend.ping()
    except GatewayError as exc:
        return False, f"FAIL {where}: {exc.detail}"
    finally:
        await backend.aclose()
    return True, f"ok   {where}, namespace {config.store_keys.prefix}:"


async def _upstream(upstreams: Upstreams, route: RouteConfig) -> tuple[bool, str]:
    upstream = upstreams.for_route(route)
    timeout = aiohttp.ClientTimeout(total=route.connect_timeout + route.read_timeout,
                                    connect=route.connect_timeout)
    try:
        async with upstream.session.get(upstream.base + "/", ssl=upstream.ssl, timeout=timeout,
                                        allow_redirects=False) as resp:
            return True, f"ok ({resp.status})"
    except TimeoutError:
        return False, "FAIL: no answer in time"
    except aiohttp.ClientError as exc:
        return False, f"FAIL: {type(exc).__name__}"


def _access(config: Config, route: RouteConfig) -> str:
    if route.auth == "public":
        return "public"
    allow, deny, source = config.rules_of(route)
    parts = [source if route.policy else ""]
    if allow is not None:
        parts.append(f"{len(allow)} allow rule(s)")
    if deny:
        parts.append(f"{len(deny)} deny rule(s)")
    if allow is None and not deny:
        parts.append("any signed-in user")
    if route.bearer:
        parts.append("bearer tokens")
    return ", ".join(part for part in parts if part)


def _table(config: Config, reached: list[tuple[bool, str]]) -> str:
    rows = [("route", "host", "path", "who", "upstream", "reached")]
    rows += [(route.name, route.host or "*", route.path_prefix, _access(config, route),
              route.upstream, status) for route, (_, status) in zip(config.routes, reached,
                                                                      strict=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                         strict=True)).rstrip()
                     for row in rows)
