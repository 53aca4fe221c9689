"""One request pipeline: which route a request is for, who is asking, and what the policy says.

`resolve` is the whole decision, shared by everything that admits requests (the proxy
handler, WebSockets included, and the forward-auth endpoint to come); the handlers only act on
its result. The route comes from the host and target given (the request's own, or, for
forward-auth, the one a trusted front describes), so every caller gets the same canonical
matching. A protected route costs one store round trip (the session load; a refresh, when due,
adds a few); a public route never touches the store, so it works while the store is down, and
never has a principal.
"""

from __future__ import annotations

from typing import NamedTuple

from aiohttp import web

from gateway import bearer, policy, ratelimit, refresh
from gateway.errors import NotFoundError
from gateway.identity import Identity
from gateway.observability import audit_log
from gateway.routing import Route, Target
from gateway.runtime import TRAIL, Runtime, Snapshot


class Principal(NamedTuple):
    """Who is asking: the user of a browser session, or an API client's bearer token.

    (This and Resolved are made for every request: as named tuples, built in C, they cost
    a fifth of a frozen dataclass, whose __init__ sets each field through
    object.__setattr__.)"""

    identity: Identity
    access_token: str  # the session's, or the bearer token itself
    id_token: str | None  # None for a bearer token
    session_id: str | None  # the session's storage id (its WebSockets are watched for its
    # end); None for a bearer token, which has no session
    expires_at: float | None = None  # a bearer token's exp: its WebSockets end then

    @property
    def bearer(self) -> bool:
        return self.session_id is None


class Resolved(NamedTuple):
    route: Route
    target: Target
    principal: Principal | None  # None on public routes, and without a live session
    decision: policy.Decision
    snapshot: Snapshot  # the config it was resolved in, for the rest of the request
    rate_fields: dict[str, str]  # RateLimit fields for the response (a rate-limited route)


async def resolve(request: web.Request, rt: Runtime, host: str, target: Target,
                  method: str) -> Resolved:
    """NotFoundError when no route serves `host` and `target`; the access log learns the
    route, the user once known, and the rule that decided."""
    snapshot = rt.snapshot  # once: a reload meanwhile does not change this request
    path = target.path
    if path == "/oauth2" or path.startswith("/oauth2/"):
        raise NotFoundError(f"no gateway endpoint {path}")
    route = snapshot.routes.match(host, path)
    if route is None:
        raise NotFoundError(f"no route for host={host!r} path={path}")
    trail = request[TRAIL]
    trail.route = route.name
    preflight = route.access.allow_preflight and policy.is_preflight(
        method, "Origin" in request.headers, "Access-Control-Request-Method" in request.headers)
    # No store round trip for a public route, nor for a method the route refuses anyway.
    needs_user = not (route.access.public or preflight) and policy.takes(route.access, method)
    principal = await _principal(request, rt, snapshot, route) if needs_user else None
    if principal is not None:
        trail.user = principal.identity.sub
    decision = policy.decide(route.access, principal.identity if principal else None, method,
                             rt.clock(), preflight=preflight)
    match decision:
        case policy.Allow(rule=rule) | policy.Deny(rule=rule) if rule is not None:
            trail.rule = rule
    _audit(route, principal, decision)
    rate_fields: dict[str, str] = {}
    # Only what would reach the upstream counts (and no coroutine for a route without limits).
    if isinstance(decision, policy.Allow) and route.config.rate_limit is not None:
        rate_fields = await ratelimit.check_route(
            request, rt, snapshot, route, principal.identity.sub if principal else None)
    return Resolved(route, target, principal, decision, snapshot, rate_fields)


def _audit(route: Route, principal: Principal | None, decision: policy.Decision) -> None:
    """The audit line of a refusal or a step-up, whoever acts on it (proxy, WebSocket,
    forward-auth)."""
    sub = principal.identity.sub if principal is not None else None
    match decision:
        case policy.Deny(rule=rule, reason=reason):
            audit_log.info("access_denied route=%s sub=%s rule=%s reason=%s", route.name, sub,
                           rule, reason)
        case policy.StepUp(max_age=max_age, acr_values=acr_values):
            audit_log.info("step_up_required route=%s sub=%s max_age=%s acr_values=%s",
                           route.name, sub, max_age, " ".join(acr_values) or None)


async def _principal(request: web.Request, rt: Runtime, snapshot: Snapshot,
                     route: Route) -> Principal | None:
    """A bearer token, on a route that takes them and a request that has one; else the
    session the cookie names."""
    if route.config.bearer:
        token = bearer.token_of(request)
        if token is not None:
            checked = await bearer.identity_of(rt, snapshot, route, token)
            return Principal(checked.identity, token, None, None, checked.expires_at)
    return await _session_principal(request, rt)


async def _session_principal(request: web.Request, rt: Runtime) -> Principal | None:
    loaded = await rt.sessions.load(rt.session_cookie_in(request))
    if loaded is not None and refresh.is_due(loaded.session, rt):
        loaded = await refresh.fresh(rt, loaded)
    if loaded is None:
        return None
    tokens = loaded.session.tokens
    return Principal(loaded.session.identity, tokens.access_token, tokens.id_token,
                     loaded.storage_id)
