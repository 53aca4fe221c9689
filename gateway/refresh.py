"""Keep a session's tokens fresh: one refresh per session at a time, across every replica.

When the access token is within `session.refresh_margin` of expiry and a refresh token exists,
the request that notices takes a short lock in the store (SET NX with an owner value, released
by compare-and-delete) and refreshes; concurrent requests for the same session, on any replica,
wait briefly for the new tokens instead of calling the IdP themselves. A lock whose holder died
expires on its own, so a session is never wedged.

Outcomes: new tokens and a current identity (a refreshed ID token is validated like the first,
must name the same subject, and replaces the groups and claims); invalid_grant ends the session
(the caller treats it as signed out); an IdP that is down keeps the session and uses the old
tokens while the access token is not past `session.refresh_grace`, else the request gets 503.
A session revoked while its refresh was in flight stays revoked (the write is conditional).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets

from gateway.errors import IdPError, IdPUnavailableError
from gateway.identity import Identity, wanted_claims
from gateway.oidc import flow, tokens
from gateway.oidc.provider import ProviderMetadata
from gateway.runtime import Runtime
from gateway.sessions.model import Session, TokenSet

log = logging.getLogger("gateway.refresh")

_WAIT_STEP = 0.05  # seconds between looks at the store while another request refreshes


def is_due(session: Session, rt: Runtime) -> bool:
    expires_at = session.tokens.expires_at
    return (session.tokens.refresh_token is not None and expires_at is not None
            and rt.clock() >= expires_at - rt.config.session.refresh_margin)


def _usable(session: Session, rt: Runtime) -> bool:
    """May the old access token still be relied on (not past expiry plus grace)?"""
    expires_at = session.tokens.expires_at
    return expires_at is None or rt.clock() < expires_at + rt.config.session.refresh_grace


async def fresh(rt: Runtime, cookie_value: str, session: Session) -> Session | None:
    """The session with usable tokens; None when the IdP ended it (invalid_grant).

    Whoever holds the lock refreshes; the others watch the store for the new tokens, and take
    the lock themselves if it is released or expires without a result (a holder that died).
    """
    store = rt.sessions
    owner = secrets.token_bytes(16)
    lock_ttl = rt.config.oidc.timeout + 5
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lock_ttl  # real time: other requests really are running
    while True:
        if await store.take_refresh_lock(cookie_value, owner, lock_ttl):
            try:
                current = await rt.sessions.load(cookie_value)
                if current is None or not is_due(current, rt):
                    return current  # another replica refreshed (or ended it) meanwhile
                return await _refresh(rt, cookie_value, current)
            finally:
                await store.release_refresh_lock(cookie_value, owner)
        if loop.time() >= deadline:
            break
        await asyncio.sleep(_WAIT_STEP)
        current = await rt.sessions.load(cookie_value)
        if current is None or current.tokens != session.tokens:
            return current
    if _usable(session, rt):
        return session
    raise IdPUnavailableError("a refresh by another request did not finish in time")


async def _refresh(rt: Runtime, cookie_value: str, session: Session) -> Session | None:
    try:
        metadata = await rt.provider.metadata()
        new_tokens = await flow.refresh(rt.idp_http, metadata, rt.client, session.tokens,
                                        now=rt.clock())
        identity = await _refreshed_identity(rt, metadata, session, new_tokens)
    except flow.InvalidGrantError:
        log.info("refresh_refused sub=%s (session ended)", session.identity.sub)
        await rt.sessions.delete(cookie_value)
        return None
    except (IdPError, IdPUnavailableError) as exc:
        log.warning("refresh_failed sub=%s detail=%s", session.identity.sub, exc.detail)
        if _usable(session, rt):
            return session
        raise IdPUnavailableError("refresh failed and the access token has expired") from exc
    refreshed = dataclasses.replace(session, identity=identity, tokens=new_tokens)
    # SECURITY: conditional on the record still being there: a sign-out or revocation that
    # landed while the token request was in flight stays in force.
    if not await rt.sessions.replace(cookie_value, refreshed):
        log.info("refresh_discarded sub=%s (the session ended meanwhile)", identity.sub)
        return None
    log.info("session_refreshed sub=%s identity_changed=%s", identity.sub,
             identity != session.identity)
    return refreshed


async def _refreshed_identity(rt: Runtime, metadata: ProviderMetadata, session: Session,
                              new: TokenSet) -> Identity:
    """Who the user is now. Core §12.2: a refreshed ID token passes the same checks as the
    first, for the same subject; the identity is rebuilt from it (completed by userinfo, as at
    login), so a user removed from a group at the IdP loses its routes at the next refresh.
    Without a new ID token the identity stays, unless oidc.refresh_userinfo asks userinfo."""
    oidc = rt.config.oidc
    if new.id_token != session.tokens.id_token:
        try:
            claims = await rt.verifier.id_token(new.id_token, nonce=None,
                                                access_token=new.access_token)
        except tokens.TokenError as exc:
            raise IdPError(f"refreshed ID token refused: {exc}") from exc
        if claims.get("sub") != session.identity.sub:
            raise IdPError("refreshed ID token names another subject")
    elif oidc.refresh_userinfo:
        claims = {"sub": session.identity.sub}
    else:
        return session.identity
    claims = await flow.with_userinfo(rt.idp_http, metadata, rt.client, new.access_token, claims,
                                      wanted=wanted_claims(oidc.groups_claim),
                                      always=oidc.refresh_userinfo)
    try:
        identity = Identity.from_claims(claims, oidc.groups_claim)
    except ValueError as exc:
        raise IdPError(f"refreshed claims unusable: {exc}") from exc
    # The sid names the IdP session; a refreshed ID token need not repeat it.
    return identity if identity.sid else dataclasses.replace(identity, sid=session.identity.sid)
