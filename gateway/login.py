"""Login: /oauth2/start, the challenge of an unauthenticated browser, and /oauth2/callback.

A login attempt (state, nonce, PKCE verifier, return path) is kept server-side for ten minutes,
is single use, and is bound to the browser that started it by a random binding cookie. That
cookie has Path=/ because a login starts on any protected path and must find the cookie of a
login already under way (several tabs: all complete); it is stripped before the upstream.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets

from aiohttp import web
from yarl import URL

from gateway import policy, ratelimit, refresh
from gateway.errors import BadRequestError, GatewayError, LoginError
from gateway.headers import client_address, client_and_reporter
from gateway.identity import Identity, wanted_claims
from gateway.observability import audit_log
from gateway.oidc import flow, tokens
from gateway.oidc.token_set import TokenSet
from gateway.pages import redirect
from gateway.routing import parse_target
from gateway.runtime import TRAIL, Runtime, runtime_from
from gateway.sessions.model import LoginAttempt
from gateway.sessions.registry import Browser
from gateway.sessions.store import ATTEMPT_TTL

log = logging.getLogger("gateway.login")

_BINDING_SHAPE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_IDP_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


def _address_of(request: web.Request, rt: Runtime) -> str:
    return client_address(request.remote or "", request.headers.getall("X-Forwarded-For", ()),
                          rt.config.server.trusted_networks)


def _binding_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def redirect_to_idp(request: web.Request, rt: Runtime, return_to: str, *,
                          max_age: int | None = None,
                          acr_values: tuple[str, ...] = ()) -> web.Response:
    """Start a login that will come back to `return_to` (already checked by the caller);
    `max_age` and `acr_values` ask for a fresh or stronger sign-in (a step-up)."""
    client, vouchers = client_and_reporter(request.remote or "",
                                           request.headers.getall("X-Forwarded-For", ()),
                                           rt.config.server.trusted_networks)
    await ratelimit.check_login_start(rt, client, vouchers=vouchers)
    metadata = await rt.provider.metadata_for_login()
    auth = flow.begin(metadata, rt.client, max_age=max_age, acr_values=acr_values)
    binding = request.cookies.get(rt.binding_cookie, "")
    if not _BINDING_SHAPE.fullmatch(binding):
        binding = secrets.token_urlsafe(32)
    attempt = LoginAttempt(auth.nonce, auth.code_verifier, return_to, _binding_hash(binding),
                           max_age, acr_values)
    await rt.sessions.save_attempt(auth.state, attempt)
    rt.metrics.login("started")
    response = redirect(auth.url)
    response.set_cookie(rt.binding_cookie, binding, max_age=int(ATTEMPT_TTL), path="/",
                        domain=rt.cookie_domain, httponly=True, samesite="Lax",
                        secure=rt.config.cookie_secure)
    return response


async def start(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    # Another site's <img>/fetch of this URL would spend its visitors' shared sign-in budget
    # (same NAT); browsers say what a request is for, and only a page load may start one.
    if request.headers.get("Sec-Fetch-Dest", "document") not in ("document", "iframe"):
        raise BadRequestError("sign-in started by a subresource request")
    requested = request.query.get("rd")
    return_to = rt.return_target(requested)
    if requested and return_to is None:
        log.warning("redirect_refused param=rd")  # the value itself may be an attack payload
    return_to = return_to or "/"
    asks = _step_up_for(rt, return_to)
    if asks is None:
        return await redirect_to_idp(request, rt, return_to)
    return await redirect_to_idp(request, rt, return_to, max_age=asks.max_age,
                                 acr_values=asks.acr_values)


def _step_up_for(rt: Runtime, return_to: str) -> policy.StepUp | None:
    """What the route the sign-in returns to asks of a sign-in (max_age, acr_values), so a
    sign-in started from elsewhere (a forward-auth front's redirect, a link) is the one that
    route needs, not one that comes back only to be sent off again."""
    url = URL(return_to)
    host = url.host if url.is_absolute() and url.host else rt.config.public_host
    try:
        target = parse_target(url.raw_path_qs if url.is_absolute() else return_to)
    except GatewayError:
        return None
    route = rt.snapshot.routes.match(host, target.path)
    return policy.step_up_of(route.access) if route is not None else None


def _idp_error(request: web.Request) -> LoginError:
    code = request.query.get("error", "")
    code = code if _IDP_ERROR_CODE.fullmatch(code) else "invalid_error_code"
    return LoginError(f"identity provider returned error={code}",
                      public_message=f"The identity provider did not complete the sign-in "
                                     f"({code}). You can try again.", reason="idp_error")


async def _complete(rt: Runtime, attempt: LoginAttempt,
                    code: str) -> tuple[dict[str, object], TokenSet]:
    """Exchange the code and return validated claims (ID token, completed by userinfo)."""
    metadata = await rt.provider.metadata()
    token_set = await flow.exchange(rt.idp_http, metadata, rt.client, code,
                                    attempt.code_verifier, now=rt.clock())
    try:
        # at_hash, when present, is checked here: before the access token is used anywhere.
        claims = await rt.verifier.id_token(token_set.id_token, nonce=attempt.nonce,
                                            access_token=token_set.access_token,
                                            max_age=attempt.max_age,
                                            acr_values=attempt.acr_values)
    except tokens.TokenError as exc:
        raise LoginError(f"ID token refused: {exc}", reason="id_token_refused") from exc
    claims = await flow.with_userinfo(rt.idp_http, metadata, rt.client, token_set.access_token,
                                      claims, wanted=wanted_claims(rt.config.oidc.groups_claim))
    refresh.note_token_lifetime(rt, token_set)
    return claims, token_set


def _warn_if_groups_missing(rt: Runtime, claims: dict[str, object]) -> None:
    """Routes with allow.groups deny everyone whose token lacks the groups claim: say so once,
    at the first such login, instead of leaving 403s to be puzzled over."""
    oidc = rt.config.oidc
    if oidc.groups_claim in claims or not any(
            rule.groups for route in rt.config.routes for rules in rt.config.rules_of(route)[:2]
            for rule in rules or ()):
        return
    if rt.first_time("groups_claim_missing"):
        log.warning("groups_claim_missing claim=%s scopes=%s: neither the ID token nor "
                    "userinfo has it, so routes with allow.groups deny these users; ask the "
                    "IdP for it (a scope or a mapper) or set oidc.groups_claim",
                    oidc.groups_claim, " ".join(oidc.scopes))


async def callback(request: web.Request) -> web.StreamResponse:
    """The IdP's answer: a session, or a failed sign-in counted and audited by its reason."""
    rt = runtime_from(request)
    try:
        return await _callback(request, rt)
    except GatewayError as exc:
        reason = exc.reason if isinstance(exc, LoginError) else exc.event
        rt.metrics.login("failed", reason)
        audit_log.warning("login_failed reason=%s status=%d detail=%s", reason, exc.status,
                          exc.detail)
        exc.routine = True  # told: the error middleware need not say it again
        raise


async def _callback(request: web.Request, rt: Runtime) -> web.StreamResponse:
    state = request.query.get("state", "")
    attempt = await rt.sessions.pop_attempt(state) if 0 < len(state) <= 256 else None
    if "error" in request.query:
        raise _idp_error(request)
    code = request.query.get("code", "")
    if attempt is None:
        raise LoginError("unknown, expired or already used state", reason="unknown_state")
    binding = request.cookies.get(rt.binding_cookie, "")
    # SECURITY: login CSRF / replayed callback: the state must belong to this browser.
    if not hmac.compare_digest(_binding_hash(binding), attempt.browser_binding):
        raise LoginError("callback came from a browser that did not start this login",
                         reason="other_browser")
    if not code:
        raise LoginError("callback has no code", reason="no_code")
    # RFC 9207 (mix-up attacks): when the IdP names itself in the response, it must be ours.
    if "iss" in request.query and request.query["iss"] != rt.config.oidc.issuer:
        raise LoginError("authorization response came from another issuer",
                         reason="issuer_mismatch")
    claims, token_set = await _complete(rt, attempt, code)
    _warn_if_groups_missing(rt, claims)
    try:
        identity = Identity.from_claims(claims, rt.config.oidc.groups_claim)
    except ValueError as exc:
        raise LoginError(f"claims unusable: {exc}", reason="claims_unusable") from exc
    previous = await rt.sessions.load(rt.session_cookie_in(request))
    if previous is not None:  # a new login ends this browser's old session
        await rt.sessions.delete(previous)
    browser = Browser.seen(_address_of(request, rt), request.headers.get("User-Agent", "-"))
    cookie = await rt.sessions.create(identity, token_set, browser)
    request[TRAIL].user = identity.sub
    rt.metrics.login("completed")
    audit_log.info("login_succeeded sub=%s sid=%s client=%s step_up=%s", identity.sub,
                   identity.sid, browser.ip, bool(attempt.max_age is not None or
                                                  attempt.acr_values))
    response = redirect(rt.return_target(attempt.return_to) or "/")
    response.set_cookie(rt.session_cookie, cookie.value,
                        max_age=int(rt.config.session.max_lifetime), path="/",
                        domain=rt.cookie_domain, httponly=True, samesite="Lax",
                        secure=rt.config.cookie_secure)
    return response
