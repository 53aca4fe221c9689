"""Forward one request to its upstream and stream the answer back (WebSockets: websocket.py).

Bodies are streamed in both directions (memory does not grow with body size) over the
route's pooled client session (upstreams.py). Redirects are not followed and bodies are not
decompressed: the client sees what the upstream sent. aiohttp client errors are translated
here: refused or broken connections are UpstreamError (502), timeouts UpstreamTimeoutError
(504).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import headers, websocket
from gateway.errors import (
    BadRequestError,
    GatewayError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gateway.pipeline import Principal, Resolved
from gateway.routing import Route, Target, host_name
from gateway.runtime import TRAIL, Runtime, Snapshot
from gateway.upstreams import relaying_interim

log = logging.getLogger("gateway.proxy")

_CHUNK = 64 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})  # RFC 9110 §9.2.2
_RETRY_DELAY = 0.1  # seconds, times the attempt number
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _client_info(request: web.Request, snapshot: Snapshot) -> headers.ClientInfo:
    peer = request.remote or ""
    trusted = headers.is_trusted(peer, snapshot.config.server.trusted_networks)
    return headers.ClientInfo(ip=peer, scheme=request.scheme, host=request.host, trusted=trusted)


def upstream_url(route: Route, target: Target, *, websocket: bool = False) -> URL:
    """The URL the upstream is sent, derived from the canonical target that was authorized.

    SECURITY: the boundary check. Whatever the URL library makes of the string (a '#' read as
    a fragment, dot segments resolved, characters re-quoted), the request target that will be
    sent must be exactly the derived one, or nothing is sent."""
    expected = target.with_path(route.upstream.base_path + route.upstream_path(target.path))
    origin = route.upstream.origin
    if websocket:
        origin = "ws" + origin.removeprefix("http")
    url = URL(origin + expected, encoded=True)
    if url.raw_path_qs != expected or url.raw_fragment:
        log.error("path_invariant_violated route=%s", route.name)
        raise BadRequestError(f"route {route.name}: the upstream target would differ from "
                              "the authorized one")
    return url


def _host_header(request: web.Request, snapshot: Snapshot, route: Route) -> str | None:
    """The Host the upstream gets (routes[].host_header); None: the upstream URL's.
    "public" is the name the route matched (the client's Host, normalised, with its port
    if it gave a number) on a route for a host, public_url's on any other."""
    if route.config.effective_host_header == "public":
        if route.host is None:
            return snapshot.config.public_host
        given = request.headers.get("Host", "")
        port = given.rsplit(":", 1)[1] if ":" in given and not given.endswith("]") else ""
        name = host_name(given)
        return f"{name}:{port}" if port.isdigit() else name
    if route.config.effective_host_header == "client":
        return request.headers.get("Host")
    return None


def _target_of(url: URL) -> str:
    """The upstream URL for a log line: which app failed, without the query (it may carry
    tokens or personal data)."""
    return str(url.with_query(None))


def _is_websocket(request: web.Request) -> bool:
    """An opening handshake (RFC 6455 §4.1: a GET); any other method's Upgrade header is
    hop-by-hop and dropped, as for every request."""
    return request.method == "GET" \
        and request.headers.get("Upgrade", "").strip().lower() == "websocket" \
        and any(token.strip().lower() == "upgrade"
                for value in request.headers.getall("Connection", [])
                for token in value.split(","))


async def forward(request: web.Request, rt: Runtime,
                  resolved: Resolved) -> web.StreamResponse:
    """Send an allowed request to its route's upstream, as its principal (None: no identity
    at all), with the settings of the snapshot it was resolved in; stream the answer back."""
    route, target, principal, snapshot = (resolved.route, resolved.target, resolved.principal,
                                          resolved.snapshot)
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        # Deferred by dispatch.defer_continue: the session and policy checks have passed.
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    upstream_headers = _request_headers(request, snapshot, route, principal)
    upgrade = _is_websocket(request)
    if upgrade:
        websocket.offer(request, upstream_headers)
    body = _client_body(request, route) if request.body_exists else None
    url = upstream_url(route, target, websocket=upgrade)
    relay = (relaying_interim(functools.partial(_relay_early_hints, request, snapshot, route))
             if route.config.early_hints else contextlib.nullcontext())
    try:
        with relay:
            sent = time.perf_counter()
            upstream = await _send(request, route, url, upstream_headers, body)
            request[TRAIL].upstream_ms = (time.perf_counter() - sent) * 1000
        async with upstream:
            if upstream.status == 101:
                if not upgrade:  # a tunnel nobody asked for: never passed on
                    raise UpstreamError(f"route {route.name}: {_target_of(url)} answered 101 "
                                        "to a request for no upgrade")
                return await websocket.accept(
                    request, upstream, rt.sockets, route,
                    session=principal.session_id if principal else None,
                    expires_at=principal.expires_at if principal else None,
                    request_id=request[TRAIL].request_id)
            response = _Proxied(status=upstream.status, reason=upstream.reason)
            response.headers.extend(_response_headers(snapshot, route, upstream.headers))
            if resolved.rate_fields:
                response.headers.update(resolved.rate_fields)
            try:
                await response.prepare(request)
            except ConnectionError:  # the client left; not the upstream's failure
                log.info("client_went_away route=%s", route.name)
                return response
            await _stream_body(request, upstream, response, route)
            return response
    except TimeoutError as exc:
        raise UpstreamTimeoutError(f"route {route.name}: {_target_of(url)} timed out") from exc
    except aiohttp.ClientError as exc:
        if isinstance(exc.__cause__, GatewayError):  # raised reading the client's body
            raise exc.__cause__ from exc
        if isinstance(exc.__cause__, _ClientLeft):
            log.info("client_went_away route=%s", route.name)
            return web.Response(status=499)  # nginx's "client closed request", for the log
        raise UpstreamError(f"route {route.name}: {_target_of(url)}: {type(exc).__name__}") from exc


def _request_headers(request: web.Request, snapshot: Snapshot, route: Route,
                     principal: Principal | None) -> CIMultiDict[str]:
    rules = snapshot.request_rules[route.name]
    client = _client_info(request, snapshot)
    host = _host_header(request, snapshot, route)
    request_id = request[TRAIL].request_id  # the client's own only if trusted
    if principal is None:
        return rules.for_upstream(request.headers, None, client, host=host,
                                  request_id=request_id)
    return rules.for_upstream(request.headers, principal.identity, client,
                              access_token=principal.access_token, id_token=principal.id_token,
                              host=host, request_id=request_id)


def _response_headers(snapshot: Snapshot, route: Route,
                      upstream_headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    options, base = route.config, route.upstream.base
    return headers.from_upstream(
        upstream_headers, prefix=route.prefix if options.strip_prefix else "/",
        origins=(base, snapshot.config.server.public_url) if options.rewrite_redirects else (),
        cookies_from=base if options.rewrite_cookie_paths else None)


async def _relay_early_hints(request: web.Request, snapshot: Snapshot, route: Route,
                             status: int, reason: str,
                             upstream_headers: CIMultiDictProxy[str]) -> None:
    """Pass a 103 Early Hints on before the final response; never to an HTTP/1.0 client,
    which would not understand it (RFC 9110 §15.2). Framing headers are dropped (a 1xx has
    no body, and a front that believed one would mis-frame) and so is any value a lenient
    parser let through with a control character; the reason phrase is our own."""
    if request.version < (1, 1):
        return
    hints = _response_headers(snapshot, route, upstream_headers)
    lines = ["HTTP/1.1 103 Early Hints"] + [
        f"{name}: {value}" for name, value in hints.items()
        if name.lower() not in _FRAMING and not _CONTROL_CHARS.search(name + value)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    with contextlib.suppress(ConnectionResetError):  # the final write will notice it too
        await request.writer.write(head)
    request.writer.output_size = 0  # the final response (or an error page) is still to come


async def _send(request: web.Request, route: Route, url: URL,
                upstream_headers: CIMultiDict[str],
                body: AsyncIterator[bytes] | None) -> aiohttp.ClientResponse:
    """Send the request; retry only what is safe to: an idempotent request without a body
    whose connection attempt failed, so it certainly never reached the upstream."""
    options, upstream = route.config, route.upstream
    retries = options.retries if request.method in _IDEMPOTENT and body is None else 0
    for attempt in range(retries + 1):
        try:
            return await upstream.session.request(
                request.method, url, headers=upstream_headers, data=body, ssl=upstream.ssl,
                allow_redirects=False, timeout=upstream.timeout)
        except aiohttp.ClientConnectorError:
            if attempt == retries:
                raise
            log.info("upstream_retry route=%s attempt=%d", route.name, attempt + 1)
            await asyncio.sleep(_RETRY_DELAY * (attempt + 1))
    raise AssertionError("unreachable: the loop returns or raises")


class _Proxied(web.StreamResponse):
    """Its headers are sent with the first body bytes written, not at prepare() (aiohttp's
    own web.Response does the same; if aiohttp drops the attribute, headers go at prepare()
    again, as before). _stream_body writes at once whatever has arrived, even nothing."""

    _send_headers_immediately = False


class _ClientLeft(Exception):
    """The client's request body broke off: it went away mid-upload."""


def _client_body(request: web.Request, route: Route) -> AsyncIterator[bytes]:
    """The request body as a stream, refused (413) once past the route's max_body_size, and
    (408) once the client has been silent for the route's read_timeout, as nginx's
    client_body_timeout: a client that trickles its body, or whose chunk framing aiohttp's
    C parser rejects mid-body (it then never ends the body), would hold an upstream
    connection for as long as it liked.

    Errors reading it are the client's and are raised as such (aiohttp hands them back as
    the __cause__ of its own error): a client that leaves mid-upload (a browser cancels
    a POST when it navigates away) is not an upstream failure, and a malformed chunked body
    is a bad request."""
    limit = route.config.max_body_size
    if limit is not None and request.content_length is not None \
            and request.content_length > limit:
        raise PayloadTooLargeError(f"route {route.name}: Content-Length over {limit}")

    async def read() -> AsyncIterator[bytes]:
        seen = 0
        try:
            while True:
                try:
                    async with asyncio.timeout(route.config.read_timeout):
                        chunk = await request.content.read(_CHUNK)
                except TimeoutError as exc:  # an OSError: aiohttp would blame the upstream
                    raise RequestTimeoutError(
                        f"route {route.name}: no body for {route.config.read_timeout:g}s") from exc
                if not chunk:
                    return
                seen += len(chunk)
                if limit is not None and seen > limit:  # chunked: no Content-Length to check
                    raise PayloadTooLargeError(f"route {route.name}: body over {limit}")
                yield chunk
        except ConnectionError as exc:
            raise _ClientLeft() from exc
        except HttpProcessingError as exc:
            raise BadRequestError(f"route {route.name}: malformed request body") from exc

    return read()


async def _stream_body(request: web.Request, upstream: aiohttp.ClientResponse,
                       response: web.StreamResponse, route: Route) -> None:
    """Copy the body; once headers are sent an error can only cut the connection.

    A client that leaves shows up as some ConnectionError on our writes (a reset, or
    "Connection lost" from a drain): that is the client going away, logged as such, with the
    status already sent; an error reading the upstream is the upstream's."""
    try:
        # What has arrived with the upstream's headers goes out with ours, in one write (a
        # small answer: one send instead of two); with nothing yet, our headers go now.
        first = upstream.content.read_nowait(_CHUNK)
        if first or not upstream.content.at_eof():
            await response.write(first)
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError:
        log.info("client_went_away route=%s", route.name)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("upstream_stream_aborted route=%s error=%s", route.name, type(exc).__name__)
        if request.transport is not None:
            request.transport.close()
