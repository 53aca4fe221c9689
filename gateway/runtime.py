"""The long-lived things one gateway app owns, and typed access to per-request state.

`Runtime` is built in app.py's cleanup context and stored under one AppKey; handlers reach it
through `runtime_from(request)`. Nothing here is module-level mutable state.

It holds two kinds of thing. What lives as long as the process: pools, caches, the store, the
IdP client, the WebSocket watch. And a `Snapshot` of what the config decides per request
(the config itself, the built routes, the stripped headers), which a config reload replaces
whole, in one assignment: a request reads the snapshot once (pipeline.resolve) and keeps it,
so it never sees half of one config and half of another.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import hdrs, web

from gateway.config import Config
from gateway.headers import RequestRules, Stripped
from gateway.metrics import Metrics
from gateway.oidc.flow import Client
from gateway.oidc.introspection import Introspector
from gateway.oidc.provider import Provider
from gateway.oidc.verifier import Verifier
from gateway.redirects import safe_return_url
from gateway.routing import RouteTable
from gateway.sessions import cookies
from gateway.sessions.store import SessionStore
from gateway.upstreams import Upstreams
from gateway.websocket import SocketWatch


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    routes: RouteTable  # built once, each route with its upstream and compiled access
    request_rules: Mapping[str, RequestRules]  # by route name: the headers sent upstream

    @classmethod
    def build(cls, config: Config, upstreams: Upstreams) -> Snapshot:
        routes = RouteTable.build(config.routes, upstreams.for_route, config.policies)
        stripped = Stripped.with_extra(config.server.strip_request_headers)
        rules = {route.name: RequestRules.build(
            route, gateway_cookies=config.session.gateway_cookies, stripped=stripped,
            unverified_email=config.oidc.allow_unverified_email) for route in routes}
        return cls(config, routes, rules)


class RequestIds:
    """New request ids: 16 random bytes each, as 32 hex digits (what secrets.token_hex(16)
    gives), drawn from os.urandom 4 KiB at a time: one getrandom call per 256 requests
    rather than one each. Not secrets (they are logged and sent upstream), but unguessable
    all the same. One per process: the Runtime is built in each worker, never forked."""

    __slots__ = ("_at", "_pool")

    POOL = 4096

    def __init__(self) -> None:
        self._pool, self._at = b"", 0

    def new(self) -> str:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(self.POOL), 0
        self._at = at + 16
        return self._pool[at:at + 16].hex()


@dataclass(slots=True)
class Runtime:
    snapshot: Snapshot  # swapped whole, never changed in place
    sessions: SessionStore
    provider: Provider
    verifier: Verifier  # every token from the IdP is checked here
    introspector: Introspector  # opaque bearer tokens (RFC 7662), with their cache
    client: Client
    upstreams: Upstreams  # the pooled client sessions the routes' upstreams use
    idp_http: aiohttp.ClientSession  # no cookies; decompresses JSON
    clock: Callable[[], float]
    sockets: SocketWatch  # open client websockets, watched for their session's end
    metrics: Metrics  # what /metrics shows (server.metrics_listen); counted always
    # Sessions whose last refresh failed in this process, and when (refresh.py backs off).
    refresh_failures: dict[str, float] = field(default_factory=dict)
    request_ids: RequestIds = field(default_factory=RequestIds)
    # Warnings this process has logged once already (first_time).
    warned: set[str] = field(default_factory=set)
    # Set when SIGTERM starts the shutdown delay: readyz says "draining" while requests are
    # still served, so the load balancer stops sending new ones before the listener closes.
    draining: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def config(self) -> Config:
        """The current config, for what lives as long as the process anyway (the IdP, the
        store, sessions); per-request settings come from the request's snapshot."""
        return self.snapshot.config

    def first_time(self, warning: str) -> bool:
        """True the first time `warning` is asked about in this process."""
        if warning in self.warned:
            return False
        self.warned.add(warning)
        return True

    def return_target(self, value: str | None) -> str | None:
        """Where a sign-in or sign-out may send the browser back to: a same-origin path, or
        a URL on server.redirect_domains (redirects.py); None when `value` is neither."""
        server = self.config.server
        return safe_return_url(value, public_origin=server.public_url,
                               domains=server.redirect_domains)

    @property
    def cookie_domain(self) -> str | None:
        return self.config.session.cookie_domain

    @property
    def session_cookie(self) -> str:
        return self.config.session.cookie_name

    @property
    def binding_cookie(self) -> str:
        return self.config.session.binding_cookie_name

    def session_cookie_in(self, request: web.Request) -> str | None:
        """The session cookie the request carries, if any (what SessionStore.load takes)."""
        return cookies.value_in(request.headers.get(hdrs.COOKIE, ""), self.session_cookie)


@dataclass(slots=True)
class Trail:
    """What the access line tells of a request, filled in as it is handled: its id (set
    first, by the access-log middleware; the upstream gets it too), then, once known, the
    route, the user's sub, the allow or deny rule that decided, and how long the upstream
    took to its response head. One record rather than a request key each: a key looked up
    and not there raises KeyError inside aiohttp's request mapping, four times on a 401."""

    request_id: str
    route: str | None = None
    user: str | None = None
    rule: str | None = None
    upstream_ms: float | None = None


RUNTIME = web.AppKey("runtime", Runtime)
TRAIL = web.RequestKey("trail", Trail)


def runtime_from(request: web.Request) -> Runtime:
    return request.app[RUNTIME]
