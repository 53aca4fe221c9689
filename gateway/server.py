"""The HTTP server around the app: aiohttp's runner, plus the answers to requests that aiohttp
refuses before any handler or middleware runs, the proxied requests handed straight to the
app's catch-all route (StraightToCatchAll), the garbage collector's settings for a serving
process (settle_gc), and the `gateway run` serve loop.

aiohttp answers every parse error with a 400. A header line over `server.max_header_size`, or
too many header lines, should be a 431 and an overlong request line a 414 (RFC 6585, RFC 9110),
so clients and operators can tell "too big" from "malformed". aiohttp builds those answers in
RequestHandler.handle_error, and only web.Server chooses the RequestHandler class, so this
module swaps both in. That relies on aiohttp internals: the runner's `_make_server` hook and
web.Server's `_loop` and `_kwargs`; tests/test_server.py fails if aiohttp changes them.
With aiohttp's pure-Python parser (no C extension) the split can be wrong for a header that
arrives in pieces or a pipelined request line; the status is still 414 or 431, never 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import uvloop
from aiohttp import hdrs, web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_urldispatcher import AbstractRoute, UrlMappingMatchInfo

from gateway import metrics, pages, reload, workers
from gateway.config import Config
from gateway.errors import GatewayError, HeadersTooLargeError, URITooLongError, bind_errors
from gateway.runtime import RUNTIME, Runtime

log = logging.getLogger("gateway")

# The app's catch-all route (every path that is not one of the gateway's own endpoints): the
# runner hands requests that only it can serve straight to it (StraightToCatchAll).
CATCH_ALL = web.AppKey("catch_all", AbstractRoute)
_ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# The Server header of every response: no product versions to fingerprint (aiohttp's default
# names the Python and aiohttp versions). Proxied responses get it too, in place of the
# upstream's, as nginx does.
SERVER_HEADER = "gateway"
MAX_REQUEST_LINE = 16 * 1024
MAX_HEADER_LINES = 128
_TOO_MANY_HEADERS = "Too many headers received"


def handler_args(max_header_size: int) -> dict[str, int]:
    """Parser limits. The two line limits must differ: the limit a LineTooLong names is how
    handle_error tells an overlong request line (414) from an overlong header (431)."""
    line_limit = MAX_REQUEST_LINE + (1 if max_header_size == MAX_REQUEST_LINE else 0)
    return {"max_field_size": max_header_size, "max_line_size": line_limit,
            "max_headers": MAX_HEADER_LINES}


def _size_error(exc: BaseException | None, line_limit: int) -> GatewayError | None:
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == line_limit:
            return URITooLongError(f"request line over {line_limit} bytes")
        return HeadersTooLargeError(f"a header line is over {limit} bytes")
    if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
        return HeadersTooLargeError(f"more than {MAX_HEADER_LINES} header lines")
    return None


class _RequestHandler(RequestHandler):
    __slots__ = ("_line_limit",)

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop,
                 max_line_size: int = MAX_REQUEST_LINE, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, max_line_size=max_line_size, **kwargs)
        self._line_limit = max_line_size

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        error = _size_error(exc, self._line_limit) if status == 400 else None
        if error is None or request.writer.output_size > 0:
            response = super().handle_error(request, status, exc, message)
            response.headers["Server"] = SERVER_HEADER
            return response
        # The offending bytes are the client's (often a cookie): never logged, never echoed.
        log.warning("%s status=%d detail=%s", error.event, error.status, error.detail)
        # The parser stopped before Accept was read. Oversized requests are nearly always a
        # browser with cookie bloat, so they get the page a person can act on.
        response = pages.render(request, error.status, error.title, error.public_message,
                                code=error.event, as_html=True)
        response.headers["Server"] = SERVER_HEADER
        response.force_close()
        return response


async def set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response the app makes names no versions."""
    response.headers["Server"] = SERVER_HEADER


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class StraightToCatchAll:
    """The server's request handler: a request that aiohttp's router could only match to the
    app's catch-all route goes straight to it, through the app's own middlewares; any other
    (the gateway's endpoints, an `Expect` header, a path the router would refuse) goes
    through the Application as before.

    What this spares a proxied request, 4% of its instructions (9% of a 401's; bench/README): the
    router's walk and match, a match info built and frozen per request, the middleware
    chain's lookup, and aiohttp's own middleware level that sets `current_app`. The request
    gets one frozen match info for the catch-all, shared by all such requests (no handler
    reads its match_dict), so `request.app` and the app's on_response_prepare signal work
    as they do through the Application. It decides by the router's own index: the router
    only tries the resources indexed at the path (decoded as it decodes it) or at one of its
    prefixes, so a path whose first segment is no other resource's can match nothing but
    the catch-all. Relies on aiohttp internals (`Request._match_info`, UrlMappingMatchInfo);
    tests/test_server.py compares both ways' answers."""

    def __init__(self, app: web.Application, route: AbstractRoute,
                 through_app: _ServerHandler) -> None:
        self._through_app = through_app
        match_info = UrlMappingMatchInfo({}, route)
        match_info.add_app(app)
        match_info.freeze()
        self._match_info = match_info
        handler: Handler = route.handler
        for middleware in reversed(app.middlewares):
            handler = functools.partial(middleware, handler=handler)
        self._handler = handler
        # Where the router indexes each resource: it tries those indexed at the path and at
        # each of its prefixes that end before a "/", so a resource indexed at "/" is tried
        # for every path. Only the catch-all may be.
        router = app.router
        index = {router._get_resource_index_key(r) for r in router.resources()
                 if r is not route.resource}
        if route.resource is None or router._get_resource_index_key(route.resource) != "/" \
                or "/" in index or router._matched_sub_app_resources:
            raise RuntimeError("the catch-all route is not the only route for every path")
        # The first segment of every other resource's index: a path that begins with one of
        # them goes through the router.
        self._others = {_first_segment(key) for key in index}

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.rel_url.path_safe  # what the router matches
        if not path.startswith("/") or _first_segment(path) in self._others \
                or hdrs.EXPECT in request.headers:
            return await self._through_app(request)
        request._match_info = self._match_info  # type: ignore[attr-defined]
        return await self._handler(request)  # type: ignore[arg-type]


def _first_segment(path: str) -> str:
    """`/a` of `/a/b` or `/a`."""
    end = path.find("/", 1)
    return path if end < 0 else path[:end]


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections answer oversized requests with 414/431, and that
    serves the app's catch-all route (`CATCH_ALL`, when the app names it) without aiohttp's
    router (StraightToCatchAll)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        kwargs: dict[str, Any] = dict(server._kwargs)
        handler: _ServerHandler = server.request_handler
        catch_all = self._app.get(CATCH_ALL) if self._app is not None else None
        if catch_all is not None:
            handler = StraightToCatchAll(self._app, catch_all, handler)
        return _Server(handler, request_factory=server.request_factory,
                       handler_cancellation=server.handler_cancellation,
                       loop=asyncio.get_running_loop(), **kwargs)


# The cyclic garbage collector, tuned for a server (bench/README: a signed-in request's p99
# 27 -> 9 ms under load, +6% req/s).
YOUNG_COLLECTION = 10_000  # container allocations between young collections (Python: 700)
# Seconds after a reload: the replaced config's requests are done by then (one still running,
# a download or a WebSocket, is settled with the rest, and collected after the next reload).
SETTLE_AFTER_RELOAD = 60.0


def settle_gc() -> None:
    """Keep what the process has made so far out of the collector's full collections.

    What a serving process makes to start (modules, the config and its routes, the pools,
    the IdP's metadata: some 75,000 objects) lives as long as it does, yet every full
    collection walked all of it: 30 ms, several times a second under load, because objects
    of requests in flight reach the oldest generation and count towards the next one. Moved
    to the permanent generation (gc.freeze), they are never walked again; what requests make
    is collected as before. Also called a while after a reload (settle_again), so a replaced
    config's reference cycles are collected rather than kept for the process's life."""
    gc.collect()
    gc.freeze()


def settle_again() -> None:
    """After a reload: the permanent generation back under collection, the garbage (the
    replaced config, once nothing uses it) collected, and the rest settled again."""
    gc.unfreeze()
    settle_gc()


def _stop_now() -> None:
    log.warning("gateway_stopping_now: a second signal during the drain; requests in flight "
                "are cut")
    logging.shutdown()
    os._exit(1)


async def _delay_shutdown(app: web.Application, delay: float, stop: asyncio.Event) -> None:
    """Keep serving for `delay` after the first signal, saying "draining" on readyz, so the
    load balancer stops sending requests before the listener closes; a second signal ends
    the wait at once."""
    if delay <= 0:
        return
    app[RUNTIME].draining.set()
    log.info("gateway_draining delay=%s", delay)
    stop.clear()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=delay)


def _reload(rt: Runtime, config_path: str) -> None:
    """SIGHUP: reload.reload, then the collector settled again once the replaced config's
    requests are done."""
    if reload.reload(rt, config_path):
        asyncio.get_running_loop().call_later(SETTLE_AFTER_RELOAD, settle_again)


def run(main: Coroutine[Any, Any, None], config: Config) -> None:
    """Run a serving process's main coroutine on server.event_loop's loop (the supervisor,
    which serves no request, keeps asyncio's)."""
    if config.server.event_loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


async def serve(app: web.Application, config: Config, config_path: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, close idle connections and
    WebSockets (1001), let in-flight requests finish for up to server.shutdown_timeout.
    SIGHUP re-reads `config_path` (reload.py)."""
    runner = GatewayRunner(app, access_log=None,
                           shutdown_timeout=config.server.shutdown_timeout)
    await runner.setup()
    gc.set_threshold(YOUNG_COLLECTION, *gc.get_threshold()[1:])
    settle_gc()
    async with contextlib.AsyncExitStack() as listeners:
        listeners.push_async_callback(runner.cleanup)
        with bind_errors("server.listen", config.server.listen):
            # A worker serves the socket its supervisor bound; a single process binds its own.
            site = web.SockSite(runner, workers.inherited_socket()) if workers.is_worker() \
                else web.TCPSite(runner, config.server.host, config.server.port)
            await site.start()
        if config.server.metrics_listen is not None and not workers.is_worker():
            # (a worker's numbers are shown by its supervisor's listener, added up)
            await listeners.enter_async_context(metrics.listener(
                config.server.metrics_listen, app[RUNTIME].metrics.current))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        log.info("gateway_serving listen=%s event_loop=%s pid=%d", config.server.listen,
                 "uvloop" if isinstance(loop, uvloop.Loop) else "asyncio", os.getpid())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if workers.is_worker():  # a supervisor killed outright
            lifeline = await workers.watch_supervisor(stop.set)
            if lifeline is not None:
                listeners.callback(lifeline.close)
        if config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, _reload, app[RUNTIME], config_path)
            # a worker starts with it blocked (workers.py): one sent meanwhile arrives now
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        await stop.wait()
        await _delay_shutdown(app, config.server.shutdown_delay, stop)
        log.info("gateway_stopping drain_timeout=%s", config.server.shutdown_timeout)
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C does not wait
            loop.add_signal_handler(sig, _stop_now)
