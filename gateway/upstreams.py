"""How each route reaches its upstream: which pooled client session, base URL and TLS.

Every http(s) route shares one pooled ClientSession (no cookies, bodies passed through as-is);
each Unix socket gets its own session over a UnixConnector. Routes with upstream_tls get their
own SSL context (a private CA, or no verification, logged loudly). Built at startup and closed
at shutdown by app.py; aiohttp errors while talking to upstreams are translated in proxy.py.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config_routes import RouteConfig, UpstreamTLSConfig

log = logging.getLogger("gateway.upstreams")

_UNIX_BASE = "http://localhost"  # the Host a Unix socket upstream sees
# Idle pooled connections are dropped before common upstream idle timeouts (5 s and more), so
# a request is rarely sent on a connection the upstream is closing (it would get a 502).
KEEPALIVE_TIMEOUT = 4.0


TLS = ssl.SSLContext | bool  # True: default verification against the system CAs


@dataclass(frozen=True, slots=True)
class Upstream:
    session: aiohttp.ClientSession
    base: str  # absolute http(s) URL that request paths are appended to
    ssl: TLS
    origin: str  # scheme://host[:port] of base
    base_path: str  # the path of base without a trailing slash ("" for an origin)
    host: str  # host[:port] of base, the Host it is sent by default
    timeout: aiohttp.ClientTimeout  # the route's, built once: every request passes it

    @classmethod
    def at(cls, session: aiohttp.ClientSession, base: str, tls: TLS,
           route: RouteConfig) -> Upstream:
        url = URL(base)
        timeout = aiohttp.ClientTimeout(total=route.total_timeout, connect=route.connect_timeout,
                                        sock_read=route.read_timeout)
        return cls(session, base, tls, str(url.origin()), url.raw_path.rstrip("/"),
                   str(url.host_port_subcomponent), timeout)


InterimHandler = Callable[[int, str, CIMultiDictProxy[str]], Awaitable[None]]
# Per request (each request is its own task), so concurrent requests never see each other's.
_ON_INTERIM: ContextVar[InterimHandler | None] = ContextVar("gateway_on_interim", default=None)


@contextmanager
def relaying_interim(handler: InterimHandler) -> Iterator[None]:
    """While active, 103 Early Hints answers to this task's upstream request are handed to
    `handler` before the final response arrives."""
    token = _ON_INTERIM.set(handler)
    try:
        yield
    finally:
        _ON_INTERIM.reset(token)


class _InterimRelayingResponse(aiohttp.ClientResponse):
    """aiohttp's client reads and drops interim responses inside `start`; this one first
    passes 103 Early Hints on. Other 1xx stay dropped: fronts such as nginx before 1.29
    mis-frame them (a desync that can hand responses to the wrong user). The connection's
    `read` is wrapped for the duration of `start` only."""

    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        handler = _ON_INTERIM.get()
        protocol = connection.protocol
        if handler is None or protocol is None:
            return await super().start(connection)
        read = protocol.read

        async def read_relaying() -> Any:
            message, payload = await read()
            if message.code == 103:
                await handler(message.code, message.reason, message.headers)
            return message, payload

        protocol.read = read_relaying
        try:
            return await super().start(connection)
        finally:
            del protocol.read


# What aiohttp's client would otherwise add to every request: the upstream sees the client's
# own headers only (and a POST without a Content-Type is sent without one).
_NOT_ADDED: CIMultiDict[None] = CIMultiDict(
    (name, None) for name in ("Accept", "Accept-Encoding", "Content-Type", "User-Agent"))


class _UpstreamRequest(aiohttp.ClientRequest):
    """A request that gets no header the client did not send. aiohttp's `skip_auto_headers`
    does the same, but copies every header of every request to do it (about 4% of a proxied
    request's time, py-spy); this sets the list aiohttp consults when it would add a
    Content-Type (in update_body_from_data and send) and adds nothing itself."""

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _NOT_ADDED

    def update_headers(self, headers: Any) -> None:
        """The headers given, as they are, when they name the Host (the proxy's always do,
        first): the CIMultiDict the proxy built for this request alone (_headers_as_built).
        Otherwise aiohttp's, in one C call instead of a Python loop over the headers: the
        Host from the URL, replaced by the one given, if any."""
        if isinstance(headers, CIMultiDict) and "Host" in headers:
            self.headers = headers
            return
        super().update_headers(None)
        if headers:
            self.headers.update(headers)


def _headers_as_built(headers: Any) -> CIMultiDict[str]:
    """ClientSession's merge of its default headers (it has none) into a copy of a
    request's: the proxy builds a new CIMultiDict for every request, which nothing else
    holds, so it is taken as it is. aiohttp's copies it in a Python loop, two lookups a
    header: about 3% of a proxied request's instructions (callgrind)."""
    if isinstance(headers, CIMultiDict):
        return headers
    return CIMultiDict(headers or ())


def _client_session(connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
    session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                    auto_decompress=False, request_class=_UpstreamRequest,
                                    response_class=_InterimRelayingResponse)
    # No switch for it either; if aiohttp stops calling it, the copy comes back, not a fault.
    session._prepare_headers = _headers_as_built  # type: ignore[method-assign]
    # aiohttp resends an idempotent request once when the connection drops after it was sent.
    # The upstream may have acted on it (legacy apps do things on GET), so the gateway only
    # retries requests that certainly never arrived (proxy._send); there is no public switch.
    session._retry_connection = False
    return session


def _ssl_context(route: str, tls: UpstreamTLSConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if not tls.verify:
        log.warning("upstream_tls_verify_off route=%s: the upstream's certificate is NOT "
                    "checked; anyone on the path can read and change this route's traffic",
                    route)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Upstreams:
    """The pooled client sessions: one shared by every http(s) upstream, one per Unix
    socket. They live as long as the process; routes hold the Upstream built for them."""

    def __init__(self) -> None:
        self._shared = _client_session(aiohttp.TCPConnector(
            limit=0, limit_per_host=0, enable_cleanup_closed=True,
            keepalive_timeout=KEEPALIVE_TIMEOUT))
        self._sessions = [self._shared]
        self._unix: dict[str, aiohttp.ClientSession] = {}  # by socket path: a reload reuses

    def for_route(self, route: RouteConfig) -> Upstream:
        if route.upstream.startswith("unix:"):
            path = route.upstream.removeprefix("unix:")
            session = self._unix.get(path)
            if session is None:
                session = self._unix[path] = _client_session(aiohttp.UnixConnector(path))
                self._sessions.append(session)
            return Upstream.at(session, _UNIX_BASE, True, route)
        tls: ssl.SSLContext | bool = True
        if route.upstream_tls is not None:
            tls = _ssl_context(route.name, route.upstream_tls)
        return Upstream.at(self._shared, route.upstream, tls, route)

    async def aclose(self) -> None:
        for session in self._sessions:
            await session.close()
