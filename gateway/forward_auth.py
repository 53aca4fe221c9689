"""Forward-auth: `/oauth2/auth` decides for a proxy that already fronts the site (nginx
auth_request, Traefik forwardAuth, Envoy ext_authz over HTTP), which then serves the request
itself.

The front describes the request it holds: its URI (X-Forwarded-Uri, X-Original-URI, or, as
Envoy sends it, the path after /oauth2/auth), host (X-Forwarded-Host, else Host), method
(X-Forwarded-Method, else the method) and scheme (X-Forwarded-Proto). SECURITY: those are
believed only from server.trusted_proxies, and must agree where several are given; anything
else is refused, never guessed at. The described request then goes through
pipeline.resolve exactly as a direct one does: the same canonical target and refusal rules,
the same route, session or bearer token, policy, step-up and rate limit.

The answers are the three that nginx's auth_request understands:
- 202 with the identity as X-Auth-Request-User, -Email, -Preferred-Username, -Groups (and
  -Access-Token on a route with pass_access_token, and the route's `headers`), for the front
  to pass on;
- 401 without a usable session or token (with WWW-Authenticate as for a direct request). A
  browser's 401 also names where to sign in (X-Auth-Request-Sign-In, for nginx's error_page)
  and its page goes there by itself (Traefik and Envoy hand the page to the browser);
- 403 for a user the policy refuses, and for every request that cannot be decided as asked
  (no route, a method the route does not take, a malformed or ambiguous description).
Failures of the IdP or the store stay 502/503: fail closed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import assert_never
from urllib.parse import quote

from aiohttp import web

from gateway import dispatch, headers, pipeline, policy
from gateway.errors import (
    BadRequestError,
    ForbiddenError,
    GatewayError,
    MethodNotAllowedError,
    NotFoundError,
    SignInRequiredError,
)
from gateway.routing import parse_target
from gateway.runtime import Runtime, runtime_from

log = logging.getLogger("gateway.forward_auth")

PATH = "/oauth2/auth"
_METHOD = re.compile(r"^[A-Z]{1,20}$")
_HOST = re.compile(r"^([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(:[0-9]{1,5})?$")
_NO_STORE = {"Cache-Control": "no-store"}
# The identity headers a direct request sends upstream, under the names fronts expect.
_ANSWER_NAMES = {
    headers.USER: "X-Auth-Request-User",
    headers.EMAIL: "X-Auth-Request-Email",
    headers.PREFERRED_USERNAME: "X-Auth-Request-Preferred-Username",
    headers.GROUPS: "X-Auth-Request-Groups",
    headers.ACCESS_TOKEN: "X-Auth-Request-Access-Token",
}


@dataclass(frozen=True, slots=True)
class Described:
    """The request the front holds, as it describes it."""

    scheme: str
    host: str
    uri: str  # as the front gave it: path and query
    method: str


async def auth(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    try:
        described = describe(request, rt)
        target = parse_target(described.uri)
        resolved = await pipeline.resolve(request, rt, described.host, target,
                                          described.method)
    except (NotFoundError, BadRequestError) as exc:
        raise ForbiddenError(f"forward-auth: {exc.detail}") from None
    match resolved.decision:
        case policy.Allow():
            return web.Response(status=202, headers={**_identity(resolved), **_NO_STORE})
        case policy.Challenge():
            raise _challenge(request, rt, described, resolved, None)
        case policy.StepUp() as step_up:
            raise _challenge(request, rt, described, resolved, step_up)
        case policy.Deny() as deny:
            raise dispatch.denial(rt, resolved, deny)
        case policy.WrongMethod():
            raise ForbiddenError(f"forward-auth: {MethodNotAllowedError.public_message} "
                                 f"(route {resolved.route.name}, {described.method})")
        case _:
            assert_never(resolved.decision)


def describe(request: web.Request, rt: Runtime) -> Described:
    """The front's request, from a trusted front only; BadRequestError (a 403 to the
    front) otherwise."""
    peer = request.remote or ""
    if not headers.is_trusted(peer, rt.config.server.trusted_networks):
        raise BadRequestError(f"{peer} is not in server.trusted_proxies: the request it "
                               "describes is not believed")
    uris = {uri for name in ("X-Forwarded-Uri", "X-Original-URI")
            if (uri := _one(request, name)) is not None}
    suffix = request.raw_path[len(PATH):]
    if suffix:  # Envoy: path_prefix /oauth2/auth, then the request's own path and query
        uris.add(suffix)
    if len(uris) != 1:
        raise BadRequestError("no X-Forwarded-Uri, X-Original-URI or path after "
                               f"{PATH}" if not uris else "the URIs given disagree")
    method = _one(request, "X-Forwarded-Method") or request.method
    if not _METHOD.fullmatch(method):
        raise BadRequestError("X-Forwarded-Method is not a method name")
    host = _one(request, "X-Forwarded-Host") or request.host
    if not _HOST.fullmatch(host):
        raise BadRequestError("X-Forwarded-Host is not one host[:port]")
    scheme = (_one(request, "X-Forwarded-Proto") or request.scheme).lower()
    if scheme not in ("http", "https"):
        raise BadRequestError("X-Forwarded-Proto is neither http nor https")
    return Described(scheme, host, uris.pop(), method)


def _one(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, ())
    if len(values) > 1:
        raise BadRequestError(f"{name} is given {len(values)} times")
    return values[0].strip() if values else None


def _identity(resolved: pipeline.Resolved) -> dict[str, str]:
    """What a direct request would send upstream as the user, named for the front."""
    principal = resolved.principal
    if principal is None:  # a public route, or a preflight: no identity
        return {}
    config = resolved.snapshot.config
    sent = headers.identity_headers(principal.identity,
                                    unverified_email=config.oidc.allow_unverified_email)
    answer = {_ANSWER_NAMES[name]: value for name, value in sent}
    if resolved.route.config.pass_access_token:
        answer[_ANSWER_NAMES[headers.ACCESS_TOKEN]] = principal.access_token
    for name, template in resolved.route.claim_headers:
        value = template.render(principal.identity,
                                unverified_email=config.oidc.allow_unverified_email)
        if value is not None:
            answer[name] = value
    return answer


def _challenge(request: web.Request, rt: Runtime, described: Described,
               resolved: pipeline.Resolved, step_up: policy.StepUp | None) -> GatewayError:
    """401; for a browser, also where to sign in: /oauth2/start returning to the request
    (it asks for the route's step-up itself)."""
    refusal = dispatch.api_challenge(request, resolved, step_up)
    if refusal is not None:
        return refusal
    return SignInRequiredError("forward-auth: no session (a browser)",
                               url=_sign_in_url(rt, described))


def _sign_in_url(rt: Runtime, described: Described) -> str:
    """/oauth2/start on the gateway's own origin (where its login cookie lives), returning
    to the front's request: a path on that origin, or a URL on server.redirect_domains."""
    public = rt.config.server.public_url
    return_to = rt.return_target(f"{described.scheme}://{described.host}{described.uri}")
    if return_to is None:
        log.warning("forward_auth_return_refused host=%s (not public_url's, nor in "
                    "server.redirect_domains)", described.host)
        return_to = "/"
    return f"{public}/oauth2/start?rd={quote(return_to, safe='')}"
