"""Keep a session's tokens fresh: one refresh per session at a time, across every replica, and
never more often than the IdP's token lifetimes make sensible.

When a refresh is due (see refresh_at) and a refresh token exists, the request that notices
takes a short lock in the store (SET NX with an owner value, released by compare-and-delete)
and refreshes. Concurrent requests for the same session, on any replica, go on with the old
tokens while those are usable; only when they are not do they wait for the new ones. A lock
whose holder died expires on its own, so a session is never wedged.

Outcomes: new tokens and a current identity (a refreshed ID token is validated like the first,
must name the same subject, and replaces the groups and claims); invalid_grant ends the session
(the caller treats it as signed out); an IdP that is down keeps the session and uses the old
tokens while the access token is not past `session.refresh_grace`, else the request gets 503,
and the session is not tried again in this process for `refresh_min_interval`.
A session revoked while its refresh was in flight stays revoked (the write is conditional).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets

from gateway.config import SessionConfig
from gateway.errors import IdPError, IdPUnavailableError
from gateway.identity import Identity, wanted_claims
from gateway.observability import logged_out
from gateway.oidc import flow, tokens
from gateway.oidc.provider import ProviderMetadata
from gateway.oidc.token_set import TokenSet
from gateway.runtime import Runtime
from gateway.sessions.model import Session
from gateway.sessions.store import Loaded

log = logging.getLogger("gateway.refresh")

_WAIT_STEP = 0.05  # seconds between looks at the store while another request refreshes
LIFETIME_SHARE = 0.5  # a token is refreshed no earlier than half way through its lifetime
_MAX_FAILURES_KEPT = 10_000  # bounds the memory of failed attempts (see _failed)
_SIGN_IN_CLAIMS = ("auth_time", "acr", "amr")


def refresh_at(token_set: TokenSet, config: SessionConfig) -> float | None:
    """When the tokens are due for a refresh; None if they never are (no refresh token, or
    no expiry). Never at the start of a token's life, whatever the margin:
    - `refresh_margin` before expiry, but no more than half the lifetime the IdP granted
      (a 60 s token with the default 60 s margin would otherwise be due when issued);
    - and no earlier than `refresh_min_interval` after it was issued,
    - unless that is past expiry plus `refresh_grace`: then at that point, when the session
      cannot go on without one."""
    expires_at = token_set.expires_at
    if token_set.refresh_token is None or expires_at is None:
        return None
    issued_at = token_set.issued_at
    if issued_at is None:  # written by an older release: the margin alone
        return expires_at - config.refresh_margin
    margin = min(config.refresh_margin, max(0.0, expires_at - issued_at) * LIFETIME_SHARE)
    due = max(expires_at - margin, issued_at + config.refresh_min_interval)
    return min(due, expires_at + config.refresh_grace)


def is_due(session: Session, rt: Runtime) -> bool:
    due = refresh_at(session.tokens, rt.config.session)
    return due is not None and rt.clock() >= due


def note_token_lifetime(rt: Runtime, token_set: TokenSet) -> None:
    """Say once per process when the IdP's access tokens live no longer than refresh_margin:
    the operator should know refreshes follow the lifetime instead."""
    if token_set.expires_at is None or token_set.issued_at is None:
        return
    lifetime = token_set.expires_at - token_set.issued_at
    margin = rt.config.session.refresh_margin
    if lifetime <= margin and rt.first_time("access_token_lifetime_short"):
        log.warning("access_token_lifetime_short lifetime=%gs refresh_margin=%gs "
                    "refresh_min_interval=%gs: sessions refresh half way through the token's "
                    "life instead, and at most every session.refresh_min_interval", lifetime,
                    margin, rt.config.session.refresh_min_interval)


def _usable(session: Session, rt: Runtime) -> bool:
    """May the old access token still be relied on (not past expiry plus grace)?"""
    expires_at = session.tokens.expires_at
    return expires_at is None or rt.clock() < expires_at + rt.config.session.refresh_grace


def _failed_recently(rt: Runtime, loaded: Loaded) -> bool:
    at = rt.refresh_failures.get(loaded.storage_id)
    return at is not None and rt.clock() < at + rt.config.session.refresh_min_interval


def _failed(rt: Runtime, loaded: Loaded) -> None:
    """Remember a failed refresh, so this process does not try that session again within
    refresh_min_interval: an IdP in trouble gets one attempt per session per interval, not
    one per request."""
    failures = rt.refresh_failures
    if len(failures) >= _MAX_FAILURES_KEPT:
        horizon = rt.clock() - rt.config.session.refresh_min_interval
        for key in [k for k, at in failures.items() if at < horizon]:
            del failures[key]
        if len(failures) >= _MAX_FAILURES_KEPT:
            failures.clear()
    failures[loaded.storage_id] = rt.clock()


class _RefreshFailed(Exception):
    """The IdP could not refresh (down, slow, or answering badly); the cause is chained."""


async def fresh(rt: Runtime, loaded: Loaded) -> Loaded | None:
    """The session with usable tokens; None when it ended (invalid_grant, or revoked).

    Whoever holds the lock refreshes. The others go on with the old tokens while those are
    usable, else watch the store for the new ones, and take the lock themselves if it is
    released or expires without a result (a holder that died).
    """
    session = loaded.session
    if _failed_recently(rt, loaded):
        if _usable(session, rt):
            return loaded
        raise IdPUnavailableError("the last refresh failed; waiting before trying again")
    store = rt.sessions
    owner = secrets.token_bytes(16)
    lock_ttl = rt.config.oidc.timeout + 5
    loop = asyncio.get_running_loop()
    deadline = loop.time() + lock_ttl  # real time: other requests really are running
    while True:
        if await store.take_refresh_lock(loaded, owner, lock_ttl):
            try:
                current = await store.load(loaded.cookie.value)
                if current is None or not is_due(current.session, rt):
                    return current  # another replica refreshed (or ended it) meanwhile
                return await _refresh(rt, current)
            except _RefreshFailed as failure:
                _failed(rt, loaded)
                if _usable(session, rt):
                    return loaded
                raise IdPUnavailableError("refresh failed and the access token has "
                                          "expired") from failure.__cause__
            finally:
                await store.release_refresh_lock(loaded, owner)
        if _usable(session, rt):
            return loaded  # someone else is refreshing: no need to wait for it
        if loop.time() >= deadline:
            break
        await asyncio.sleep(_WAIT_STEP)
        current = await store.load(loaded.cookie.value)
        if current is None or current.session.tokens != session.tokens:
            return current
    raise IdPUnavailableError("a refresh by another request did not finish in time")


async def _refresh(rt: Runtime, loaded: Loaded) -> Loaded | None:
    session = loaded.session
    try:
        metadata = await rt.provider.metadata()
        new_tokens = await flow.refresh(rt.idp_http, metadata, rt.client, session.tokens,
                                        now=rt.clock())
        identity = await _refreshed_identity(rt, metadata, session, new_tokens)
    except flow.InvalidGrantError:
        rt.metrics.refresh("refused")
        logged_out(rt, "refresh_refused", 1, sub=session.identity.sub,
                   sid=session.identity.sid)
        await rt.sessions.delete(loaded)
        return None
    except (IdPError, IdPUnavailableError) as exc:
        rt.metrics.refresh("failed")
        log.warning("refresh_failed sub=%s detail=%s", session.identity.sub, exc.detail)
        raise _RefreshFailed from exc
    note_token_lifetime(rt, new_tokens)
    refreshed = dataclasses.replace(session, identity=identity, tokens=new_tokens)
    # SECURITY: conditional on the record still being there: a sign-out or revocation that
    # landed while the token request was in flight stays in force.
    stored = await rt.sessions.replace(loaded, refreshed)
    if stored is None:
        rt.metrics.refresh("discarded")
        log.info("refresh_discarded sub=%s (the session ended meanwhile)", identity.sub)
        return None
    rt.metrics.refresh("refreshed")
    log.info("session_refreshed sub=%s identity_changed=%s", identity.sub,
             identity != session.identity)
    return stored


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
    kept = session.identity.claims or {}
    if new.id_token == session.tokens.id_token:  # userinfo renews what it says; the rest of
        claims = {**kept, **claims}  # the login's claims stays
    else:  # Core §12.2: a refresh is no sign-in. When and how the user signed in stays
        # the login's, whatever a new ID token says (one that moved auth_time forward would
        # let a refresh pass for the fresh sign-in a step-up route asks for)
        claims = {**claims, **{k: kept[k] for k in _SIGN_IN_CLAIMS if k in kept}}
    try:
        identity = Identity.from_claims(claims, oidc.groups_claim)
    except ValueError as exc:
        raise IdPError(f"refreshed claims unusable: {exc}") from exc
    # The sid names the IdP session; a refreshed ID token need not repeat it.
    return identity if identity.sid else dataclasses.replace(identity, sid=session.identity.sid)
