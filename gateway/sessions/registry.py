"""What ops and logout channels need without a session's key: who, since when, from where.

For every session the store keeps, beside the sealed record, a small clear-text entry
(`<prefix>:meta:{H}`: user, times, client IP and user agent; never a token or a cookie part)
and indexes, user (sub, email) -> sessions and IdP sid -> sessions. Revocation by user or sid
deletes records without decrypting them. Index entries whose session has ended are dropped
lazily. Key names come from keys.py. Only `record` (a new session)
writes unconditionally; later writes replace an entry only while it exists, so a revoked
session's entry is never brought back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from gateway.identity import Identity
from gateway.sessions.backends import Backend
from gateway.sessions.keys import Keys


@dataclass(frozen=True, slots=True)
class SessionInfo:
    storage_id: str
    sub: str
    email: str | None
    sid: str | None
    created_at: float
    last_seen: float
    expires_at: float
    client_ip: str
    user_agent: str

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SessionInfo:
        return cls(**json.loads(raw))


@dataclass(frozen=True, slots=True)
class Client:
    """Where a login came from, for the admin listing."""

    ip: str = "-"
    user_agent: str = "-"


UNKNOWN_CLIENT = Client()


class Registry:
    def __init__(self, backend: Backend, keys: Keys, max_lifetime: float) -> None:
        self._backend = backend
        self._keys = keys
        self._max = max_lifetime

    async def record(self, info: SessionInfo, ttl: float, identity: Identity) -> None:
        """A new session's entry and its indexes."""
        await self._backend.set(self._keys.meta(info.storage_id), info.to_bytes(), ttl)
        await self._index(info, identity)

    async def update(self, info: SessionInfo, ttl: float, identity: Identity) -> None:
        """A live session's entry after its identity was refreshed (the email may differ)."""
        if await self._write_beside_session(info, ttl):
            # A revocation between these two steps leaves at most an index member without
            # a session, which every lookup drops.
            await self._index(info, identity)

    async def _write_beside_session(self, info: SessionInfo, ttl: float) -> bool:
        """Only while the session lives: never recreates a revoked session's entry, and
        restores one that was lost (evicted) while its session went on."""
        return await self._backend.set_beside(
            self._keys.meta(info.storage_id), info.to_bytes(), ttl,
            anchor=self._keys.session(info.storage_id))

    async def _index(self, info: SessionInfo, identity: Identity) -> None:
        await self._backend.index_add(self._keys.by_sub(identity.sub), info.storage_id,
                                      self._max)
        if identity.email:
            await self._backend.index_add(self._keys.by_email(identity.email), info.storage_id,
                                          self._max)
        if identity.sid:
            await self._backend.index_add(self._keys.by_sid(identity.sid), info.storage_id,
                                          self._max)

    async def get(self, storage_id: str) -> SessionInfo | None:
        raw, _ = await self._backend.get(self._keys.meta(storage_id))
        return SessionInfo.from_bytes(raw) if raw else None

    async def idle_ttl(self, storage_id: str) -> float | None:
        """Seconds until the session ends if unused (its record's TTL); None if gone."""
        value, ttl = await self._backend.get(self._keys.session(storage_id))
        return ttl if value is not None else None

    async def touch(self, info: SessionInfo, ttl: float) -> None:
        """Keep the entry as long as its session, with the new last-seen time."""
        await self._write_beside_session(info, ttl)

    async def _live(self, index: str, sub: str = "") -> list[SessionInfo]:
        """The sessions an index names that still live. A member whose session ended is
        dropped; one whose entry alone was lost (evicted) stays, as a bare entry, so it can
        still be revoked."""
        infos: list[SessionInfo] = []
        ended = []
        for member in await self._backend.index_members(index):
            info = await self.get(member)
            if info is None:
                value, _ = await self._backend.get(self._keys.session(member))
                if value is None:
                    ended.append(member)
                    continue
                info = SessionInfo(member, sub, None, None, 0.0, 0.0, 0.0, "-", "-")
            infos.append(info)
        await self._backend.index_remove(index, ended)
        return sorted(infos, key=lambda i: i.created_at)

    async def by_user(self, sub_or_email: str) -> list[SessionInfo]:
        """Sessions of a user named by sub or (case-insensitively) by email."""
        by_email = await self._live(self._keys.by_email(sub_or_email))
        unique = {info.storage_id: info for info in (*await self.by_sub(sub_or_email), *by_email)}
        return sorted(unique.values(), key=lambda i: i.created_at)

    async def by_sub(self, sub: str) -> list[SessionInfo]:
        return await self._live(self._keys.by_sub(sub), sub)

    async def by_sid(self, sid: str) -> list[SessionInfo]:
        return await self._live(self._keys.by_sid(sid))

    async def all(self) -> list[SessionInfo]:
        infos = []
        for key in await self._backend.keys(self._keys.meta_prefix):
            info = await self.get(self._keys.storage_id_of_meta(key))
            if info is not None:
                infos.append(info)
        return sorted(infos, key=lambda i: i.created_at)

    async def revoke(self, infos: list[SessionInfo]) -> int:
        """Delete sessions without their keys; returns how many were live."""
        keys = self._keys
        names = [name for info in infos
                 for name in (keys.session(info.storage_id), keys.meta(info.storage_id))]
        await self._backend.delete(*names)
        return len(infos)
