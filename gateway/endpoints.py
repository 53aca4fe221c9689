"""The gateway's own small endpoints: /oauth2/userinfo, /oauth2/healthz, /oauth2/readyz."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import GatewayError, NotAuthenticatedError
from gateway.runtime import TRAIL, runtime_from

_NO_STORE = {"Cache-Control": "no-store"}


async def userinfo(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    loaded = await rt.sessions.load(rt.session_cookie_in(request))
    if loaded is None:
        raise NotAuthenticatedError("userinfo without a session")
    identity = loaded.session.identity
    request[TRAIL].user = identity.sub
    return web.json_response({
        "user": identity.sub,
        "email": identity.email,
        "email_verified": identity.email_verified,
        "preferred_username": identity.preferred_username,
        "groups": list(identity.groups),
    }, headers=_NO_STORE)


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"}, headers=_NO_STORE)


async def readyz(request: web.Request) -> web.StreamResponse:
    """Should this replica get traffic? Yes once the IdP metadata is loaded (retried here if
    not), until a drain begins (server.shutdown_delay).

    The store is not counted: when Redis blips, every replica sees it at once, and taking
    them all out of the load balancer would turn the 503 pages of protected routes into
    connection errors and take the public routes down too. `?full` counts it as well (for
    monitoring, or for fronts that should stop sending requests while it is down)."""
    rt = runtime_from(request)
    if rt.draining.is_set():
        return web.json_response({"status": "draining"}, status=503, headers=_NO_STORE)
    checks: dict[str, str] = {}
    try:
        await rt.provider.metadata()
        checks["idp"] = "ok"
    except GatewayError as exc:
        checks["idp"] = exc.public_message
    if "full" in request.query:
        try:
            await rt.sessions.ping()
            checks["store"] = "ok"
        except GatewayError as exc:
            checks["store"] = exc.public_message
    ready = all(value == "ok" for value in checks.values())
    return web.json_response({"status": "ready" if ready else "not ready", **checks},
                             status=200 if ready else 503, headers=_NO_STORE)
