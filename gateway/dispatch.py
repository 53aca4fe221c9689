"""The catch-all handler: route -> session -> policy -> proxy, challenge or deny.

The whole per-request path reads top to bottom here. One store round trip (the session load, on
protected routes only; a token refresh, when due, adds a few); public routes never touch the
store, so they keep working when it is down, and never carry identity headers.
"""

from __future__ import annotations

from typing import assert_never

from aiohttp import web

from gateway import policy, proxy, refresh
from gateway.errors import ForbiddenError, NotAuthenticatedError, NotFoundError
from gateway.login import redirect_to_idp
from gateway.pages import wants_html
from gateway.redirects import safe_return_path
from gateway.routing import Target, parse_target
from gateway.runtime import ROUTE_NAME, USER_SUB, Runtime, runtime_from


async def handle(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    target = parse_target(request.raw_path)
    path = target.path
    if path == "/oauth2" or path.startswith("/oauth2/"):
        raise NotFoundError(f"no gateway endpoint {path}")
    route = rt.routes.match(request.host, path)
    if route is None:
        raise NotFoundError(f"no route for host={request.host!r} path={path}")
    request[ROUTE_NAME] = route.name
    loaded = None
    if not route.access.public:
        loaded = await rt.sessions.load(request.cookies.get(rt.session_cookie))
        if loaded is not None and refresh.is_due(loaded.session, rt):
            loaded = await refresh.fresh(rt, loaded)
    identity = loaded.session.identity if loaded else None
    decision = policy.decide(route.access, identity)
    match decision:
        case policy.Allow(identity=allowed):
            if allowed is not None:
                request[USER_SUB] = allowed.sub
            if loaded is None:
                return await proxy.forward(request, rt, route, target, None)
            return await proxy.forward(request, rt, route, target, allowed,
                                       loaded.session.tokens.access_token,
                                       session_id=loaded.storage_id)
        case policy.Challenge():
            return await _challenge(request, rt, target)
        case policy.Deny(reason=reason):
            assert identity is not None
            request[USER_SUB] = identity.sub
            raise ForbiddenError(
                f"route {route.name}: {reason}",
                signed_in_as=identity.preferred_username or identity.email or identity.sub,
                sign_out_by_post="POST" in rt.config.session.sign_out_methods)
        case _:
            assert_never(decision)


async def defer_continue(request: web.Request) -> None:
    """Expect: 100-continue is answered only once the request may proceed (in proxy.forward),
    so a client without a session is refused before it sends its body."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="Unknown Expect value")


async def _challenge(request: web.Request, rt: Runtime, target: Target) -> web.StreamResponse:
    """Browsers go to the IdP and come back to exactly this URL; API clients get a 401."""
    if not wants_html(request):
        raise NotAuthenticatedError("no session on a protected route")
    return_to = target.with_path(target.path)
    return await redirect_to_idp(request, rt, safe_return_path(return_to) or "/")
