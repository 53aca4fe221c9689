"""What ops and logout channels need without a session's key: who, since when, from where.

For every session the store keeps, beside the sealed record, a small clear-text entry
(`gateway:meta:{H}`: user, times, client IP and user agent; never a token or a cookie part) and
two indexes, user -> sessions and IdP sid -> sessions. Revocation by user or sid deletes
records without decrypting them. Index entries whose session has ended are dropped lazily.
Index keys use the sub/sid hash as a Redis Cluster hash tag. Only `record` (a new session)
writes unconditionally; later writes replace an entry only while it exists, so a revoked
session's entry is never brought back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from gateway.identity import Identity
from gateway.sessions.backends import Backend

SESSION_PREFIX = "gateway:session:"
META_PREFIX = "gateway:meta:"
_SUB_PREFIX = "gateway:sub:"
_EMAIL_PREFIX = "gateway:email:"
_SID_PREFIX = "gateway:sid:"


def _tag(value: str) -> str:
    return "{" + hashlib.sha256(value.encode()).hexdigest() + "}"


def session_key(storage_id: str) -> str:
    return SESSION_PREFIX + "{" + storage_id + "}"


def meta_key(storage_id: str) -> str:
    return META_PREFIX + "{" + storage_id + "}"


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
    def __init__(self, backend: Backend, max_lifetime: float) -> None:
        self._backend = backend
        self._max = max_lifetime

    async def record(self, info: SessionInfo, ttl: float, identity: Identity) -> None:
        """A new session's entry and its indexes."""
        await self._backend.set(meta_key(info.storage_id), info.to_bytes(), ttl)
        await self._index(info, identity)

    async def update(self, info: SessionInfo, ttl: float, identity: Identity) -> None:
        """A live session's entry after its identity was refreshed (the email may differ)."""
        if await self._backend.replace(meta_key(info.storage_id), info.to_bytes(), ttl):
            # A revocation between these two steps leaves at most an index member without
            # an entry, which every lookup drops.
            await self._index(info, identity)

    async def _index(self, info: SessionInfo, identity: Identity) -> None:
        await self._backend.index_add(_SUB_PREFIX + _tag(identity.sub), info.storage_id,
                                      self._max)
        if identity.email:
            await self._backend.index_add(_EMAIL_PREFIX + _tag(identity.email.lower()),
                                          info.storage_id, self._max)
        if identity.sid:
            await self._backend.index_add(_SID_PREFIX + _tag(identity.sid), info.storage_id,
                                          self._max)

    async def get(self, storage_id: str) -> SessionInfo | None:
        raw, _ = await self._backend.get(meta_key(storage_id))
        return SessionInfo.from_bytes(raw) if raw else None

    async def touch(self, info: SessionInfo, ttl: float) -> None:
        """Keep the entry as long as its session, with the new last-seen time (only while it
        exists: a revoked session's entry is not recreated)."""
        await self._backend.replace(meta_key(info.storage_id), info.to_bytes(), ttl)

    async def _live(self, index: str) -> list[SessionInfo]:
        members = await self._backend.index_members(index)
        infos = {m: await self.get(m) for m in members}
        await self._backend.index_remove(index, [m for m, i in infos.items() if i is None])
        return sorted((i for i in infos.values() if i is not None), key=lambda i: i.created_at)

    async def by_user(self, sub_or_email: str) -> list[SessionInfo]:
        """Sessions of a user named by sub or (case-insensitively) by email."""
        by_email = await self._live(_EMAIL_PREFIX + _tag(sub_or_email.lower()))
        unique = {info.storage_id: info for info in (*await self.by_sub(sub_or_email), *by_email)}
        return sorted(unique.values(), key=lambda i: i.created_at)

    async def by_sub(self, sub: str) -> list[SessionInfo]:
        return await self._live(_SUB_PREFIX + _tag(sub))

    async def by_sid(self, sid: str) -> list[SessionInfo]:
        return await self._live(_SID_PREFIX + _tag(sid))

    async def all(self) -> list[SessionInfo]:
        infos = []
        for key in await self._backend.keys(META_PREFIX):
            info = await self.get(key.removeprefix(META_PREFIX).strip("{}"))
            if info is not None:
                infos.append(info)
        return sorted(infos, key=lambda i: i.created_at)

    async def revoke(self, infos: list[SessionInfo]) -> int:
        """Delete sessions without their keys; returns how many were live."""
        keys = [k for info in infos
                for k in (session_key(info.storage_id), meta_key(info.storage_id))]
        await self._backend.delete(*keys)
        return len(infos)
