"""What ops and logout channels need without a session's key: who, since when, from where.

For every session the store keeps, beside the sealed record, a small clear-text entry
(`<prefix>:entry:{H}`: user, times, client IP and user agent; never a token or a cookie part)
and indexes, user (sub, email) -> sessions and IdP sid -> sessions. Revocation by user or sid
deletes records without decrypting them. Index entries whose session has ended are dropped
lazily. Key names come from keys.py. Only `record` (a new session)
writes unconditionally; later writes replace an entry only while it exists, so a revoked
session's entry is never brought back.

The indexes live in shared buckets (keys.py), where a member is found by a 64-bit tag: every
session a lookup finds is checked against its entry (its sub, verified email or sid must be
the one asked for), so no user ever sees, or revokes, another's sessions by a tag they share.
An earlier release's indexes (a sorted set per value) are read beside them, and written too
while `write_legacy_indexes` is on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from gateway.identity import Identity, email_address
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
    email_verified: bool = False  # only a verified email is indexed (revoke --user EMAIL)
    deployment: str = ""  # keys.deployment_tag: listings in a shared namespace keep apart

    def to_bytes(self) -> bytes:
        """A JSON array of the fields after storage_id (which the key names), behind a
        version: an entry is in Redis once per session, and its field names and id were
        a third of it."""
        fields = asdict(self)
        return json.dumps([_ENTRY_VERSION, *(fields[name] for name in _STORED)],
                          separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, storage_id: str, raw: bytes) -> SessionInfo:
        """The entry stored under `storage_id`'s key; an earlier release's (a JSON object
        with every field named) too."""
        data = json.loads(raw)
        if isinstance(data, dict):
            return cls(**{name: data[name] for name in _INFO_FIELDS if name in data})
        if not isinstance(data, list) or not data or data[0] != _ENTRY_VERSION:
            raise ValueError("unsupported registry entry")
        return cls(storage_id, *data[1:len(_STORED) + 1])

    @classmethod
    def bare(cls, storage_id: str, sub: str = "") -> SessionInfo:
        """A session whose entry is lost (evicted, say): enough to revoke it."""
        return cls(storage_id, sub, None, None, 0.0, 0.0, 0.0, "-", "-")


_INFO_FIELDS = tuple(SessionInfo.__dataclass_fields__)
_STORED = _INFO_FIELDS[1:]  # all but storage_id, in their order
_ENTRY_VERSION = 2  # 1: a JSON object


@dataclass(frozen=True, slots=True)
class Browser:
    """The browser a login came from (its address and User-Agent), for the admin listing;
    not to be confused with oidc.flow.Client, the gateway's credentials at the IdP."""

    ip: str = "-"
    user_agent: str = "-"

    @classmethod
    def seen(cls, ip: str, user_agent: str) -> Browser:
        """From request values (the user's to choose): printable ASCII only, bounded, so a
        listing can neither break on them nor send control sequences to a terminal."""
        return cls(_printable(ip, 64) or "-", _printable(user_agent, 200) or "-")


def _printable(text: str, limit: int) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


UNKNOWN_BROWSER = Browser()


def _names(info: SessionInfo, kind: str, value: str) -> bool:
    """Is `info` a session that index `kind` names for `value`? (An index's tag may be
    shared with another value's in its bucket.)"""
    if kind == "sub":
        return info.sub == value
    if kind == "sid":
        return info.sid == value
    return info.email_verified and info.email is not None \
        and email_address(info.email) == value


class Registry:
    """Entries and indexes. An index member lives as long as its session would if unused
    (each touch renews it), and is removed when its session ends by sign-out or revocation;
    so the store holds the same after any number of logins and sign-outs."""

    def __init__(self, backend: Backend, keys: Keys, *,
                 write_legacy_indexes: bool = False) -> None:
        self._backend = backend
        self._keys = keys
        self._write_legacy = write_legacy_indexes

    async def record(self, info: SessionInfo, ttl: float, identity: Identity,
                     sealed: bytes) -> None:
        """A new session: its sealed record, its entry and its indexes, in one round trip."""
        await self._backend.set_indexed(
            [(self._keys.session(info.storage_id), sealed),
             (self._keys.entry(info.storage_id), info.to_bytes())], ttl,
            self._entries_of(info, identity, legacy=self._write_legacy))

    async def update(self, info: SessionInfo, ttl: float, identity: Identity) -> None:
        """A live session's entry after its identity was refreshed (the email may differ)."""
        if await self._write_beside_session(info, ttl):
            # A revocation between these two steps leaves at most an index member without
            # a session, which every lookup drops, and whose time runs out with it.
            await self._index(info, ttl, identity)

    async def _write_beside_session(self, info: SessionInfo, ttl: float) -> bool:
        """Only while the session lives: never recreates a revoked session's entry, and
        restores one that was lost (evicted) while its session went on."""
        return await self._backend.set_beside(
            self._keys.entry(info.storage_id), info.to_bytes(), ttl,
            anchor=self._keys.session(info.storage_id))

    def _indexes(self, info: SessionInfo,
                 identity: Identity | None = None) -> list[tuple[str, str]]:
        """The indexes that name the session, as (kind, value): its sub, its verified
        email, its IdP sid."""
        sub, sid = (identity.sub, identity.sid) if identity else (info.sub, info.sid)
        verified = identity.email_verified if identity else info.email_verified
        email = email_address(info.email) if info.email and verified else None
        named = [("sub", sub)] if sub else []
        if email:
            named.append(("email", email))
        if sid:
            named.append(("sid", sid))
        return named

    def _entries_of(self, info: SessionInfo, identity: Identity | None = None,
                    *, legacy: bool) -> list[tuple[str, str]]:
        """The session's (index key, member) pairs: in the buckets, and in the earlier
        release's indexes when `legacy`."""
        keys, pairs = self._keys, []
        for kind, value in self._indexes(info, identity):
            bucket, tag = keys.index(kind, value)
            pairs.append((bucket, keys.index_member(tag, info.storage_id)))
            if legacy:
                pairs.append((keys.legacy_index(kind, value), info.storage_id))
        return pairs

    async def _index(self, info: SessionInfo, ttl: float,
                     identity: Identity | None = None) -> None:
        """Index the session for as long as it lives unused. Repeated on every touch, which
        renews the members' time and restores an index lost to eviction. One round trip for
        all of them."""
        await self._backend.index_add(
            self._entries_of(info, identity, legacy=self._write_legacy), ttl)

    async def forget(self, infos: list[SessionInfo]) -> None:
        """Take ended sessions out of their indexes (sign-out, revocation, expiry), the
        earlier release's included, in one round trip."""
        await self._backend.index_remove(
            [pair for info in infos for pair in self._entries_of(info, legacy=True)])

    async def get(self, storage_id: str) -> SessionInfo | None:
        return (await self._entries([storage_id]))[0]

    async def _entries(self, storage_ids: list[str]) -> list[SessionInfo | None]:
        """Each session's entry, or its entry of an earlier release (keys.legacy_entry), in
        one round trip; None where neither is there."""
        keys = self._keys
        raws = await self._backend.get_many([name for storage_id in storage_ids for name in
                                             (keys.entry(storage_id),
                                              keys.legacy_entry(storage_id))])
        found = []
        for index, storage_id in enumerate(storage_ids):
            raw = raws[2 * index] or raws[2 * index + 1]
            found.append(SessionInfo.from_bytes(storage_id, raw) if raw else None)
        return found

    async def idle_ttl(self, storage_id: str) -> float | None:
        """Seconds until the session ends if unused (its record's TTL); None if gone."""
        value, ttl = await self._backend.get(self._keys.session(storage_id))
        return ttl if value is not None else None

    async def touch(self, info: SessionInfo, ttl: float) -> None:
        """Keep the entry and the index members as long as their session, with the new
        last-seen time."""
        if await self._write_beside_session(info, ttl):
            await self._index(info, ttl)

    async def _live(self, kind: str, value: str) -> list[SessionInfo]:
        """The sessions index `kind` names for `value` that still live, in two round trips
        whatever their number (members, then their entries). A session whose entry names
        another value (a tag shared in the bucket) is not one of them. A member whose
        session ended is dropped; one whose entry alone was lost (evicted) stays, as a bare
        entry, so it can still be revoked."""
        keys = self._keys
        bucket, tag = keys.index(kind, value)
        legacy = keys.legacy_index(kind, value)
        tagged, listed = await self._backend.index_members([(bucket, tag), (legacy, "")])
        members = sorted({keys.storage_id_in(m) for m in tagged} | listed)
        entries = await self._entries(members)
        infos = {m: info for m, info in zip(members, entries, strict=True)
                 if info is not None and _names(info, kind, value)}
        lost = [m for m, info in zip(members, entries, strict=True) if info is None]
        if lost:
            records = await self._backend.get_many([keys.session(m) for m in lost])
            for member, record in zip(lost, records, strict=True):
                if record is not None:
                    infos[member] = SessionInfo.bare(member, value if kind == "sub" else "")
            gone = [m for m in lost if m not in infos]
            await self._backend.index_remove(
                [(bucket, keys.index_member(tag, m)) for m in gone]
                + [(legacy, m) for m in gone])
        return sorted(infos.values(), key=lambda i: i.created_at)

    async def by_user(self, sub_or_email: str) -> list[SessionInfo]:
        """Sessions of a user named by sub or by verified email (compared as addresses)."""
        email = email_address(sub_or_email)
        by_email = await self._live("email", email) if email else []
        unique = {info.storage_id: info for info in (*await self.by_sub(sub_or_email), *by_email)}
        return sorted(unique.values(), key=lambda i: i.created_at)

    async def by_sub(self, sub: str) -> list[SessionInfo]:
        return await self._live("sub", sub)

    async def by_sid(self, sid: str) -> list[SessionInfo]:
        return await self._live("sid", sid)

    async def all(self) -> list[SessionInfo]:
        """Every session of this deployment: by its entries, and by the session records
        themselves for any whose entry was lost (so --all and --session still reach them)."""
        keys = self._keys
        entries = sorted({keys.storage_id_of(k) for prefix in keys.entry_prefixes
                          for k in await self._backend.keys(prefix)})
        sessions = [keys.storage_id_of(k) for k in await self._backend.keys(keys.session_prefix)]
        infos = []
        for storage_id in entries:
            info = await self.get(storage_id)
            # a namespace shared by mistake: another deployment's entries are not ours
            if info is not None and info.deployment in ("", keys.deployment_tag):
                infos.append(info)
        infos += [SessionInfo.bare(s) for s in sorted(set(sessions) - set(entries))]
        return sorted(infos, key=lambda i: i.created_at)

    async def revoke(self, infos: list[SessionInfo]) -> int:
        """Delete sessions without their keys; returns how many were live."""
        keys = self._keys
        names = [name for info in infos
                 for name in (keys.session(info.storage_id), keys.entry(info.storage_id),
                              keys.legacy_entry(info.storage_id))]
        await self._backend.delete(*names)
        if infos:  # every process drops its cached copy (cache.py)
            await self._backend.publish(keys.invalidations,
                                        " ".join(info.storage_id for info in infos))
        await self.forget(infos)
        return len(infos)
