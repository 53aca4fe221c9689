"""Build the aiohttp Application: middlewares, the route table, and the runtime's lifecycle.

Resources (the upstream and IdP client sessions, the session backend, provider metadata) are
opened in one cleanup context, so they are closed only if they were opened, in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from gateway import (
    dispatch,
    endpoints,
    forward_auth,
    login,
    logout,
    observability,
    server,
    sessions_page,
    websocket,
)
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.observability import access_log_middleware
from gateway.oidc.flow import Client
from gateway.oidc.introspection import Introspector
from gateway.oidc.provider import Provider
from gateway.oidc.verifier import Verifier
from gateway.pages import error_middleware
from gateway.runtime import RUNTIME, Runtime, Snapshot
from gateway.sessions.backends import open_backend
from gateway.sessions.store import SessionStore
from gateway.upstreams import Upstreams

log = logging.getLogger("gateway")

# A refused request's unread body is drained (so the client sees the answer, not a reset)
# for at most this long, not aiohttp's default 10 s.
LINGERING_TIME = 2.0


def _client(config: Config) -> Client:
    oidc = config.oidc
    return Client(client_id=oidc.client_id, client_secret=oidc.secret(),
                  redirect_uri=config.redirect_uri, scopes=oidc.scopes,
                  auth_method=oidc.token_endpoint_auth_method, timeout=oidc.timeout)


def _runtime_context(config: Config, clock: Callable[[], float]
                     ) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        metrics = Metrics()
        backend = open_backend(config.session, clock=clock, observe=metrics.store_call)
        upstreams = Upstreams()
        idp_http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        sessions = SessionStore(backend, config.store_keys,
                                idle_timeout=config.session.idle_timeout,
                                max_lifetime=config.session.max_lifetime, clock=clock,
                                cache_ttl=config.session.cache_ttl,
                                write_legacy_indexes=config.session.write_legacy_indexes)
        try:
            provider = Provider(idp_http, config.oidc.issuer, timeout=config.oidc.timeout,
                                clock=clock, observe=metrics.idp_fetch)
            client = _client(config)
            verifier = Verifier(provider, client_id=client.client_id,
                                client_secret=client.client_secret,
                                leeway=config.oidc.clock_skew, clock=clock)
            introspector = Introspector(
                idp_http, provider, client, endpoint=config.api.introspection_endpoint,
                cache_ttl=config.api.introspection_cache, leeway=config.oidc.clock_skew,
                clock=clock)
            app[RUNTIME] = Runtime(
                snapshot=Snapshot.build(config, upstreams), sessions=sessions,
                provider=provider, verifier=verifier, introspector=introspector,
                client=client, upstreams=upstreams,
                idp_http=idp_http, clock=clock, metrics=metrics,
                sockets=websocket.SocketWatch(sessions.alive, clock=clock,
                                              counted=metrics.websockets))
            try:
                await provider.metadata()
            except GatewayError as exc:
                log.warning("discovery_failed_at_startup detail=%s (will retry)", exc.detail)
            await app[RUNTIME].sessions.warn_if_evicting()
            follow = asyncio.create_task(sessions.follow_invalidations()) \
                if config.session.cache_ttl > 0 else None
            try:
                yield
            finally:
                if follow is not None:
                    await _stop_listening(follow)
        finally:
            metrics.flush()  # with workers, what the supervisor's scrapes add up
            await upstreams.aclose()
            await idp_http.close()
            await backend.aclose()

    return context


async def _stop_listening(listener: asyncio.Task[None]) -> None:
    """Cancel the invalidation listener and wait for it to end, cancelling it again if the
    cancellation was lost: redis-py connecting on uvloop has been seen to swallow one, and
    the worker then never finished its shutdown."""
    for _ in range(20):
        listener.cancel()
        done, _ = await asyncio.wait({listener}, timeout=0.25)
        if done:
            return
    log.warning("invalidation_listener_stuck: it did not end when cancelled")


async def _close_websockets(app: web.Application) -> None:
    await app[RUNTIME].sockets.close_all()


def build_app(config: Config, *, clock: Callable[[], float] = time.time) -> web.Application:
    app = web.Application(middlewares=[access_log_middleware, error_middleware],
                          handler_args={**server.handler_args(config.server.max_header_size),
                                        "lingering_time": LINGERING_TIME})
    observability.redact_framework_logs()
    app.cleanup_ctx.append(_runtime_context(config, clock))
    app.on_shutdown.append(_close_websockets)
    app.on_response_prepare.append(server.set_server_header)
    app.router.add_get("/oauth2/start", login.start)
    app.router.add_get("/oauth2/callback", login.callback)
    app.router.add_route("GET", "/oauth2/sign_out", logout.sign_out)
    app.router.add_route("POST", "/oauth2/sign_out", logout.sign_out)
    app.router.add_get(logout.SIGNED_OUT, logout.signed_out)
    app.router.add_post("/oauth2/backchannel_logout", logout.backchannel_logout)
    app.router.add_get("/oauth2/frontchannel_logout", logout.frontchannel_logout)
    app.router.add_get("/oauth2/userinfo", endpoints.userinfo)
    app.router.add_get(sessions_page.PATH, sessions_page.show)
    app.router.add_post(sessions_page.PATH, sessions_page.end)
    app.router.add_route("*", forward_auth.PATH, forward_auth.auth)
    app.router.add_route("*", forward_auth.PATH + "/{tail:.*}", forward_auth.auth)
    app.router.add_get("/oauth2/healthz", endpoints.healthz)
    app.router.add_get("/oauth2/readyz", endpoints.readyz)
    app[server.CATCH_ALL] = app.router.add_route("*", "/{tail:.*}", dispatch.handle,
                                                 expect_handler=dispatch.defer_continue)
    return app
