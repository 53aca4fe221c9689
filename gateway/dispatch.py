"""The catch-all handler: it acts on what pipeline.resolve decided: proxy, challenge or deny.

The whole per-request path reads top to bottom here and in pipeline.py.
"""

from __future__ import annotations

from typing import assert_never

from aiohttp import web

from gateway import pipeline, policy, proxy
from gateway.errors import (
    ForbiddenError,
    InsufficientScopeError,
    MethodNotAllowedError,
    NotAuthenticatedError,
    StepUpRequiredError,
)
from gateway.login import redirect_to_idp
from gateway.pages import wants_html
from gateway.redirects import safe_return_path
from gateway.routing import parse_target
from gateway.runtime import Runtime, runtime_from


async def handle(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    resolved = await pipeline.resolve(request, rt, request.host,
                                      parse_target(request.raw_path), request.method)
    route = resolved.route
    match resolved.decision:
        case policy.Allow():  # public routes have no principal: no identity goes upstream
            return await proxy.forward(request, rt, resolved)
        case policy.Challenge():
            return await _challenge(request, rt, resolved, asks=policy.step_up_of(route.access))
        case policy.StepUp() as step_up:
            return await _challenge(request, rt, resolved, asks=step_up, stepping_up=True)
        case policy.Deny() as deny:
            raise denial(rt, resolved, deny)
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


def denial(rt: Runtime, resolved: pipeline.Resolved, deny: policy.Deny) -> ForbiddenError:
    """The 403 for a refused principal (here and at forward-auth): a browser's page says who
    was refused and offers a sign-out; a bearer token gets RFC 6750's insufficient_scope
    when a scopes rule would have let it in."""
    principal, route = resolved.principal, resolved.route
    assert principal is not None
    detail = f"route {route.name}: {deny.reason}"
    error: ForbiddenError
    if principal.bearer:
        error = InsufficientScopeError(detail, scopes=deny.scopes) if deny.scopes \
            else ForbiddenError(detail)
    else:
        identity = principal.identity
        error = ForbiddenError(
            detail, signed_in_as=identity.preferred_username or identity.email or identity.sub,
            sign_out_by_post="POST" in rt.config.session.sign_out_methods)
    error.routine = True  # pipeline.resolve's audit line has told it
    return error


def api_challenge(request: web.Request, resolved: pipeline.Resolved,
                  step_up: policy.StepUp | None) -> NotAuthenticatedError | None:
    """The 401 for an API client (or a bearer token, which no sign-in can help), saying
    what it lacks when signed in already (RFC 9470) or that a token would do (RFC 6750
    §3); None for a browser, which is sent to sign in."""
    principal = resolved.principal
    if wants_html(request) and (principal is None or not principal.bearer):
        return None
    if step_up is not None:
        return StepUpRequiredError("the sign-in is too old or too weak for this route",
                                   max_age=step_up.max_age, acr_values=step_up.acr_values)
    return NotAuthenticatedError("no session on a protected route",
                                 bearer=resolved.route.config.bearer)


async def _challenge(request: web.Request, rt: Runtime, resolved: pipeline.Resolved, *,
                     asks: policy.StepUp | None, stepping_up: bool = False
                     ) -> web.StreamResponse:
    """Browsers go to the IdP and come back to exactly this URL, the sign-in asked for the
    route's max_age and acr_values (so a first sign-in there needs no second one); API
    clients get a 401 (api_challenge)."""
    refusal = api_challenge(request, resolved, asks if stepping_up else None)
    if refusal is not None:
        raise refusal
    target = resolved.target
    return_to = safe_return_path(target.with_path(target.path)) or "/"
    if asks is None:
        return await redirect_to_idp(request, rt, return_to)
    return await redirect_to_idp(request, rt, return_to, max_age=asks.max_age,
                                 acr_values=asks.acr_values)
