"""SessionStore: what the app uses to create, load and delete sessions and login attempts.

Records are sealed with AES-GCM under a key the store never keeps: a session's key travels in
its cookie, a login attempt's key is derived from its state (which only the browser and the IdP
see). The backend key (a hash) and the deployment (issuer and client_id) are bound into the
AEAD, so a record can neither be moved to another name nor be accepted by another gateway that
shares the store. A dump of the store therefore yields neither tokens nor usable cookies.

The store also names the other operations the gateway needs from the backend (the refresh
lock, logout replay markers, sign-in counters, the readiness ping), so no caller builds a key
or talks to the backend itself; keys.py defines every key.

Sliding idle timeout without a write per request: the record's TTL *is* the idle timer, read
together with the value in one round trip; it is pushed forward only once the session has been
idle for a touch interval, and never beyond max_lifetime from login.

Recently loaded sessions (`cache_ttl`): served from this process's memory, and dropped the
moment any process of the deployment revokes or changes them (cache.py). Every revocation
(registry.revoke) and every replace names the session on the deployment's invalidation
channel.

A revoked session stays revoked: every write that follows a read (new tokens after a refresh,
the idle touch, the registry entry) is conditional on the record still being there (SET XX,
PEXPIRE), so a sign-out, back-channel logout or admin revoke that lands while a refresh is in
flight is never undone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.identity import Identity
from gateway.oidc.token_set import TokenSet
from gateway.sessions.backends import Backend, Rate
from gateway.sessions.cache import RecentSessions
from gateway.sessions.cookies import SessionCookie
from gateway.sessions.keys import Keys
from gateway.sessions.model import LoginAttempt, Session
from gateway.sessions.registry import UNKNOWN_BROWSER, Browser, Registry, SessionInfo

log = logging.getLogger("gateway.store")

ATTEMPT_TTL = 600.0  # 10 minutes: covers an IdP login with MFA, and clock skew
_NONCE_BYTES = 12


def _attempt_key(state: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"gateway login attempt").derive(state.encode())


@dataclass(frozen=True, slots=True)
class Loaded:
    """A live session and the cookie that named it, as load() found them. What follows a
    load (replace, delete, the refresh lock, the WebSocket watch) takes this, so a request's
    cookie string is parsed once."""

    cookie: SessionCookie
    session: Session

    @property
    def storage_id(self) -> str:
        return self.cookie.storage_id


class SessionStore:
    def __init__(self, backend: Backend, keys: Keys, *, idle_timeout: float,
                 max_lifetime: float, clock: Callable[[], float],
                 cache_ttl: float = 0.0, write_legacy_indexes: bool = False) -> None:
        self.backend = backend
        self.recent = RecentSessions(cache_ttl, clock,
                                     lambda loaded: self._ttl(loaded.session.created_at) > 0)
        self.keys = keys
        self.registry = Registry(backend, keys, write_legacy_indexes=write_legacy_indexes)
        self._idle = idle_timeout
        self._max = max_lifetime
        self._clock = clock
        # Touch at most once per interval: bounds store writes to one per user per interval.
        self._touch_interval = min(60.0, idle_timeout / 10)

    def _name(self, cookie: SessionCookie) -> str:
        return self.keys.session(cookie.storage_id)

    def _seal(self, key: bytes, name: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + AESGCM(key).encrypt(nonce, plaintext, self._bound(name))

    def _open(self, key: bytes, name: str, sealed: bytes) -> bytes | None:
        try:
            return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:],
                                       self._bound(name))
        except (InvalidTag, ValueError):
            return None

    def _bound(self, name: str) -> bytes:
        """The associated data: the record's name and its deployment."""
        # SECURITY: a gateway of another deployment that shares the store (and perhaps, by
        # mistake, the key prefix) accepts none of this deployment's records.
        return name.encode() + b"\n" + self.keys.deployment

    def _info(self, cookie: SessionCookie, session: Session) -> SessionInfo:
        identity = session.identity
        return SessionInfo(cookie.storage_id, identity.sub, identity.email, identity.sid,
                           session.created_at, self._clock(), session.created_at + self._max,
                           session.client_ip, session.user_agent, identity.email_verified,
                           self.keys.deployment_tag)

    def info_of(self, loaded: Loaded) -> SessionInfo:
        """A live session's registry entry, as it would be written now."""
        return self._info(loaded.cookie, loaded.session)

    def _ttl(self, created_at: float) -> float:
        return min(self._idle, created_at + self._max - self._clock())

    async def create(self, identity: Identity, tokens: TokenSet,
                     browser: Browser = UNKNOWN_BROWSER) -> SessionCookie:
        """Always a new id and key: a login never reuses a cookie (no session fixation)."""
        cookie = SessionCookie.new()
        session = Session(identity, tokens, self._clock(), browser.ip, browser.user_agent)
        name = self._name(cookie)
        ttl = self._ttl(session.created_at)
        await self.registry.record(self._info(cookie, session), ttl, identity,
                                   self._seal(cookie.key, name, session.to_bytes()))
        return cookie

    async def load(self, cookie_value: str | None) -> Loaded | None:
        """The live session named by the cookie, or None (absent, expired, tampered)."""
        if cookie_value is None:
            return None
        if self.recent.on and (loaded := self.recent.get(cookie_value)) is not None:
            return loaded
        cookie = SessionCookie.parse(cookie_value)
        if cookie is None:
            return None
        if not self.recent.on:
            return await self._load(cookie)
        generation = self.recent.generation
        loaded = await self._load(cookie)
        self.recent.put(cookie, loaded, generation)
        return loaded

    async def follow_invalidations(self) -> None:
        """For the app's life, with the cache on: see cache.py."""
        await self.recent.follow(self.backend, self.keys.invalidations)

    async def _load(self, cookie: SessionCookie) -> Loaded | None:
        name = self._name(cookie)
        sealed, ttl = await self.backend.get(name)
        if sealed is None:
            return None
        plain = self._open(cookie.key, name, sealed)
        if plain is None:
            return None  # a cookie with the right id but another key: never a session
        try:
            session = Session.from_bytes(plain)
        except (ValueError, KeyError, TypeError):
            return None  # written by an incompatible release: treat as signed out
        remaining = self._ttl(session.created_at)
        if remaining <= 0:
            await self.registry.revoke([self._info(cookie, session)])
            return None
        if ttl is None or remaining - ttl >= self._touch_interval:
            await self.backend.expire(name, remaining)  # a no-op on a record deleted meanwhile
            await self.registry.touch(self._info(cookie, session), remaining)
        return Loaded(cookie, session)

    async def replace(self, loaded: Loaded, session: Session) -> Loaded | None:
        """Store new tokens and identity for a live session, under the same cookie; None
        (and nothing written) when the session was deleted since it was loaded."""
        cookie = loaded.cookie
        name = self._name(cookie)
        ttl = self._ttl(session.created_at)
        sealed = self._seal(cookie.key, name, session.to_bytes())
        if not await self.backend.replace(name, sealed, ttl):
            self.recent.drop([cookie.storage_id])
            return None
        await self.registry.update(self._info(cookie, session), ttl, session.identity)
        # Other processes' copies hold the old tokens and identity (groups may have changed)
        await self.backend.publish(self.keys.invalidations, cookie.storage_id)
        replaced = Loaded(cookie, session)
        self.recent.put(cookie, replaced, self.recent.generation)
        return replaced

    async def delete(self, loaded: Loaded) -> None:
        """Sign-out: the record, its entry and its index members (a session whose entry was
        lost leaves members that run out with its time)."""
        self.recent.drop([loaded.storage_id])
        info = await self.registry.get(loaded.storage_id)
        await self.registry.revoke([info or SessionInfo.bare(loaded.storage_id)])

    async def save_attempt(self, state: str, attempt: LoginAttempt) -> None:
        name = self.keys.attempt(state)
        sealed = self._seal(_attempt_key(state), name, attempt.to_bytes())
        await self.backend.set(name, sealed, ATTEMPT_TTL)

    async def pop_attempt(self, state: str) -> LoginAttempt | None:
        """Single use: the record is gone once read, whatever happens next."""
        name = self.keys.attempt(state)
        sealed = await self.backend.pop(name)
        plain = self._open(_attempt_key(state), name, sealed) if sealed is not None else None
        return LoginAttempt.from_bytes(plain) if plain is not None else None

    async def take_refresh_lock(self, loaded: Loaded, owner: bytes, ttl: float) -> bool:
        """The one refresh of a session at a time, across replicas (SET NX PX)."""
        return await self.backend.add_once(self.keys.refresh_lock(loaded.storage_id), ttl,
                                           owner)

    async def release_refresh_lock(self, loaded: Loaded, owner: bytes) -> None:
        """Only while we still own it: a lock that expired and was taken over stays."""
        await self.backend.delete_if(self.keys.refresh_lock(loaded.storage_id), owner)

    async def first_use_of_logout_jti(self, jti: str, ttl: float) -> bool:
        """False when a logout token with this jti was seen within `ttl` (a replay)."""
        return await self.backend.add_once(self.keys.logout_jti(jti), ttl)

    async def count_login_start(self, bucket: str, window: int, ttl: float) -> int:
        """One more sign-in start in `bucket` during fixed window number `window`."""
        return await self.backend.count(self.keys.login_starts(bucket, window), ttl)

    async def rate(self, route: str, kind: str, who: str, limit: int, period: float) -> Rate:
        """One request against a route's rate limit, for `who` (a user, an address, or ""
        for the whole route), shared by every replica."""
        return await self.backend.rate(self.keys.rate(route, kind, who), limit, period)

    async def alive(self, storage_ids: Collection[str]) -> set[str]:
        """Which of these sessions still exist, in one round trip. Only existence: nothing is
        read or decrypted, and the idle timeout does not slide (watching is not using)."""
        ids = list(storage_ids)
        found = await self.backend.exists_many([self.keys.session(i) for i in ids])
        return {i for i, exists in zip(ids, found, strict=True) if exists}

    async def ping(self) -> None:
        await self.backend.ping()

    async def warn_if_evicting(self) -> None:
        """Evicted registry entries and indexes leave sessions that no revocation finds: say
        so at start when the store shows a policy that evicts."""
        policy = await self.backend.eviction_policy()
        if policy not in (None, "noeviction"):
            log.warning("store_evicts_keys policy=%s: the store's maxmemory-policy evicts; "
                        "evicted registry entries and indexes leave sessions that no "
                        "revocation finds; set maxmemory-policy noeviction", policy)
