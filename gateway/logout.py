"""Sign-out (the browser's) and back-channel logout (the IdP's).

Sign-out deletes the server-side session and the cookie. With an end_session_endpoint in
discovery, the browser then goes there (RP-Initiated Logout 1.0) with id_token_hint, client_id,
post_logout_redirect_uri = public_url + /oauth2/signed_out (the one URI the IdP must have
registered) and, when the user asked to land somewhere (rd), that path as `state`, which the
IdP hands back; otherwise straight there. /oauth2/signed_out then redirects to the path in
`state`, or shows a "signed out" page. rd is checked like every return path, twice.

Back-channel logout (OIDC Back-Channel Logout 1.0): the IdP POSTs a signed logout token; the
sessions it names (by sid, else every session of the sub) are deleted from the store, so every
replica refuses them on their next request (no replica caches sessions).
"""

from __future__ import annotations

from aiohttp import web
from yarl import URL

from gateway.errors import (
    BadRequestError,
    ForbiddenError,
    IdPError,
    IdPUnavailableError,
    MethodNotAllowedError,
    NotFoundError,
)
from gateway.observability import logged_out
from gateway.oidc import tokens
from gateway.pages import redirect, render
from gateway.runtime import TRAIL, Runtime, runtime_from
from gateway.sessions.registry import SessionInfo

SIGNED_OUT = "/oauth2/signed_out"


def same_origin(request: web.Request, public_url: str) -> bool:
    """CSRF check for POST: the form must come from a page of our own origin."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == public_url
    referer = request.headers.get("Referer", "")
    return referer == public_url or referer.startswith(public_url + "/")


async def sign_out(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    if request.method not in rt.config.session.sign_out_methods:
        raise MethodNotAllowedError(f"sign-out by {request.method} is not enabled")
    # SECURITY: logout CSRF. A cross-site form must not end the user's session.
    if request.method == "POST" and not same_origin(request, rt.config.server.public_url):
        raise ForbiddenError("sign-out POST from another origin")
    requested = request.query.get("rd")
    return_to = rt.return_target(requested) if requested else None
    loaded = await rt.sessions.load(rt.session_cookie_in(request))
    target = return_to or SIGNED_OUT
    if loaded is not None:
        await rt.sessions.delete(loaded)
        session = loaded.session
        request[TRAIL].user = session.identity.sub
        logged_out(rt, "sign_out", 1, sub=session.identity.sub, sid=session.identity.sid)
        try:
            metadata = await rt.provider.metadata()
        except (IdPError, IdPUnavailableError):
            metadata = None  # the local session is gone; the IdP session will time out itself
        if metadata is not None and metadata.end_session_endpoint:
            query = {"id_token_hint": session.tokens.id_token, "client_id": rt.client.client_id,
                     "post_logout_redirect_uri": rt.config.server.public_url + SIGNED_OUT}
            if return_to:
                query["state"] = return_to  # §3: the IdP passes it back to SIGNED_OUT
            target = str(URL(metadata.end_session_endpoint).update_query(query))
    response = redirect(target)
    response.del_cookie(rt.session_cookie, path="/", domain=rt.cookie_domain)
    return response


async def signed_out(request: web.Request) -> web.StreamResponse:
    """Where sign-out ends: the path the user asked for (the `state` the IdP handed back, or
    rd when the IdP has no logout endpoint), else a page saying so, with a way back in."""
    return_to = runtime_from(request).return_target(request.query.get("state"))
    if return_to is not None:
        return redirect(return_to)
    return render(request, 200, "Signed out", "You are signed out.", code="signed_out",
                  as_html=True, link=("/oauth2/start", "Sign in again"))


class LogoutTokenError(BadRequestError):
    """§2.8: a logout token we cannot honour gets 400 with an OAuth-style error code."""

    public_message = "The logout token is invalid."
    event = "invalid_request"


async def _sessions_named(rt: Runtime, claims: dict[str, object]) -> list[SessionInfo]:
    sid, sub = claims.get("sid"), claims.get("sub")
    if isinstance(sid, str):
        named = await rt.sessions.registry.by_sid(sid)
        # A bare entry (its details were lost) has no sub to compare: the sid names it.
        return [info for info in named if not isinstance(sub, str) or info.sub in (sub, "")]
    assert isinstance(sub, str)
    return await rt.sessions.registry.by_sub(sub)


async def backchannel_logout(request: web.Request) -> web.StreamResponse:
    rt = runtime_from(request)
    form = await request.post()
    token = form.get("logout_token")
    if not isinstance(token, str) or not token:
        raise LogoutTokenError("back-channel logout without logout_token")
    try:
        claims = await rt.verifier.logout_token(token)
    except tokens.TokenError as exc:
        raise LogoutTokenError(f"logout token refused: {exc}") from exc
    # §2.6 (10): a jti seen before (within the token's useful life) is a replay.
    if not await rt.sessions.first_use_of_logout_jti(str(claims["jti"]),
                                                     tokens.MAX_TOKEN_AGE + rt.verifier.leeway):
        raise LogoutTokenError("logout token replayed (jti seen before)")
    revoked = await rt.sessions.registry.revoke(await _sessions_named(rt, claims))
    logged_out(rt, "backchannel", revoked, sub=claims.get("sub"), sid=claims.get("sid"))
    return web.Response(status=200, headers={"Cache-Control": "no-store"})


async def frontchannel_logout(request: web.Request) -> web.StreamResponse:
    """OIDC Front-Channel Logout 1.0, for IdPs that only do that (off unless configured).

    The IdP loads this URL in an iframe. Browsers do not send SameSite=Lax cookies there, so
    the session is found by the iss and sid parameters alone, as the spec allows.
    """
    rt = runtime_from(request)
    if not rt.config.session.frontchannel_logout:
        raise NotFoundError("front-channel logout is not enabled")
    sid = request.query.get("sid", "")
    if request.query.get("iss") != rt.config.oidc.issuer or not sid:
        raise BadRequestError("front-channel logout needs this IdP's iss and a sid")
    revoked = await rt.sessions.registry.revoke(await rt.sessions.registry.by_sid(sid))
    logged_out(rt, "frontchannel", revoked, sid=sid)
    return web.Response(text="<!doctype html><title>Signed out</title>", content_type="text/html",
                        headers={"Cache-Control": "no-store"})
