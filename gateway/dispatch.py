"""The catch-all handler: it acts on what pipeline.resolve decided: proxy, challenge or deny.

The whole per-request path reads top to bottom here and in pipeline.py.
"""

from __future__ import annotations

from typing import assert_never

from aiohttp import web

from gateway import pipeline, policy, proxy
from gateway.errors import ForbiddenError, MethodNotAllowedError, NotAuthenticatedError
from gateway.login import redirect_to_idp
from gateway.pages import wants_html
from gateway.redirects import safe_return_path
from gateway.routing import Target, parse_target
from gateway.runtime import Runtime, runtime_from


async def handle(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    resolved = await pipeline.resolve(request, rt, request.host,
                                      parse_target(request.raw_path), request.method)
    route, principal = resolved.route, resolved.principal
    match resolved.decision:
        case policy.Allow():  # public routes have no principal: no identity goes upstream
            return await proxy.forward(request, rt, resolved)
        case policy.Challenge():
            return await _challenge(request, rt, resolved.target)
        case policy.Deny(reason=reason):
            assert principal is not None
            identity = principal.identity
            raise ForbiddenError(
                f"route {route.name}: {reason}",
                signed_in_as=identity.preferred_username or identity.email or identity.sub,
                sign_out_by_post="POST" in rt.config.session.sign_out_methods)
        case policy.WrongMethod(allowed=allowed):
            raise MethodNotAllowedError(f"route {route.name}: {request.method} is not in its "
                                        "methods", allowed=allowed)
        case _:
            assert_never(resolved.decision)


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
