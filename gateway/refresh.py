"""Keep a session's tokens fresh: one refresh per session at a time, across every replica.

When the access token is within `session.refresh_margin` of expiry and a refresh token exists,
the request that notices takes a short lock in the store (SET NX with an owner value, released
by compare-and-delete) and refreshes; concurrent requests for the same session, on any replica,
wait briefly for the new tokens instead of calling the IdP themselves. A lock whose holder died
expires on its own, so a session is never wedged.

Outcomes: new tokens (a refreshed ID token is validated like the first, and must name the same
subject); invalid_grant ends the session (the caller treats it as signed out); an IdP that is
down keeps the session and uses the old tokens while the access token is not past
`session.refresh_grace`, else the request gets 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets

from gateway.errors import IdPError, IdPUnavailableError
from gateway.oidc import flow, tokens
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


def lock_name(cookie_value: str) -> str:
    return "gateway:lock:{" + hashlib.sha256(cookie_value.encode()).hexdigest() + "}"


async def fresh(rt: Runtime, cookie_value: str, session: Session) -> Session | None:
    """The session with usable tokens; None when the IdP ended it (invalid_grant).

    Whoever holds the lock refreshes; the others watch the store for the new tokens, and take
    the lock themselves if it is released or expires without a result (a holder that died).
    """
    backend = rt.sessions.backend
    lock, owner = lock_name(cookie_value), secrets.token_bytes(16)
    lock_ttl = rt.config.oidc.timeout + 5
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lock_ttl  # real time: other requests really are running
    while True:
        if await backend.add_once(lock, lock_ttl, owner):
            try:
                current = await rt.sessions.load(cookie_value)
                if current is None or not is_due(current, rt):
                    return current  # another replica refreshed (or ended it) meanwhile
                return await _refresh(rt, cookie_value, current)
            finally:
                await backend.delete_if(lock, owner)
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
        await _check_id_token(rt, session, new_tokens)
    except flow.InvalidGrantError:
        log.info("refresh_refused sub=%s (session ended)", session.identity.sub)
        await rt.sessions.delete(cookie_value)
        return None
    except (IdPError, IdPUnavailableError) as exc:
        log.warning("refresh_failed sub=%s detail=%s", session.identity.sub, exc.detail)
        if _usable(session, rt):
            return session
        raise IdPUnavailableError("refresh failed and the access token has expired") from exc
    refreshed = dataclasses.replace(session, tokens=new_tokens)
    await rt.sessions.replace(cookie_value, refreshed)
    log.info("session_refreshed sub=%s", session.identity.sub)
    return refreshed


async def _check_id_token(rt: Runtime, session: Session, new: TokenSet) -> None:
    """Core §12.2: a refreshed ID token passes the same checks, for the same subject."""
    if new.id_token == session.tokens.id_token:
        return
    metadata = await rt.provider.metadata()
    try:
        kid = tokens.header_of(new.id_token).get("kid")
        keys = await rt.provider.keys(kid if isinstance(kid, str) else None)
        claims = tokens.validate_id_token(new.id_token, keys, rt.expectations(metadata),
                                          nonce=None)
    except tokens.TokenError as exc:
        raise IdPError(f"refreshed ID token refused: {exc}") from exc
    if claims.get("sub") != session.identity.sub:
        raise IdPError("refreshed ID token names another subject")
