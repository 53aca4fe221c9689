"""Every key the gateway writes to its store, defined in one place, under one deployment's
namespace.

Many gateways commonly share one Redis (a sidecar per legacy app). Each deployment's keys live
under its own prefix, so no two deployments ever read each other's sessions, login attempts,
locks, counters, replay markers or registry indexes. The default prefix is derived from the
issuer and the client_id (`gateway:<16 hex>:`); `session.key_prefix` names one explicitly, for
replicas of one app that should share it on purpose (they share issuer and client_id anyway,
so the default already does that). Sealed records are bound to the deployment a second time,
in their AEAD associated data (store.py), so even a namespace shared by mistake between two
clients never lets one accept the other's cookie; and the registry's user, email and sid
indexes hash the issuer and client_id in, so one IdP's (or one app's) `alice` is never
another's, and the logout replay markers the issuer.

Braces are Redis Cluster hash tags: the hash that relates keys (a session and its registry
entry) sits in braces, so they share a slot.

The registry's indexes (user, email, IdP sid -> sessions) share 4,096 bucket keys rather than
taking a key each: a key of its own cost about 300 bytes of Redis memory (its name, object,
dictionary and expiry entries) to hold one 64-byte member, three times per session. An index
`index(kind, value)` is a bucket, chosen by the hash of the deployment, the kind and the
value, and a tag (the next 64 bits of that hash) that begins each of its members; the rest of
a member is the session's storage id. A tag shared by two values in one bucket is harmless:
the registry checks every session it finds against its entry (registry.py).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from gateway.sessions.cookies import b64url

PREFIX_SHAPE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _hex(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


TAG_LENGTH = 11  # an index tag: the base64url of 64 bits of its hash


def default_prefix(issuer: str, client_id: str) -> str:
    return "gateway:" + _hex(issuer, client_id)[:16]


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str  # without the trailing ':'
    issuer: str  # the deployment: hashed into index names, bound into sealed records
    client_id: str

    @classmethod
    def for_deployment(cls, issuer: str, client_id: str, key_prefix: str | None) -> Keys:
        return cls(key_prefix or default_prefix(issuer, client_id), issuer, client_id)

    @property
    def deployment(self) -> bytes:
        return f"{self.issuer}\n{self.client_id}".encode()

    def session(self, storage_id: str) -> str:
        return f"{self.prefix}:session:{{{storage_id}}}"

    def entry(self, storage_id: str) -> str:
        """The clear-text registry entry beside a session (same slot)."""
        return f"{self.prefix}:entry:{{{storage_id}}}"

    def legacy_entry(self, storage_id: str) -> str:
        """Where releases before registry entry format 2 kept the entry, in format 1. Still
        read, and deleted on revocation, until those sessions have ended. The new format
        has a name of its own so that a replica of such a release, during a rolling
        upgrade, finds no entry rather than one it cannot read (which would fail its
        request), and goes by the session record, as for an entry lost to eviction: its
        revocations by user and sid still work."""
        return f"{self.prefix}:meta:{{{storage_id}}}"

    @property
    def entry_prefixes(self) -> tuple[str, str]:
        return f"{self.prefix}:entry:", f"{self.prefix}:meta:"

    @property
    def session_prefix(self) -> str:
        return f"{self.prefix}:session:"

    @staticmethod
    def storage_id_of(key: str) -> str:
        """The storage id a session's record or entry key names (in its hash tag)."""
        return key[key.rindex("{") + 1:].rstrip("}")

    @property
    def deployment_tag(self) -> str:
        """Names the deployment in its registry entries, without naming issuer or client."""
        return _hex(self.issuer, self.client_id)[:16]

    def index(self, kind: str, value: str) -> tuple[str, str]:
        """The bucket key of index `kind` ("sub", "email" as identity.email_address parsed
        it, "sid") for `value`, and the tag its members begin with (module docstring)."""
        digest = hashlib.sha256("\n".join((self.issuer, self.client_id, kind, value))
                                .encode()).digest()
        bucket = int.from_bytes(digest[:2], "big") >> 4  # 12 bits: 4,096 buckets
        return f"{self.prefix}:index:{{{bucket:03x}}}", b64url(digest[2:10])

    @staticmethod
    def index_member(tag: str, storage_id: str) -> str:
        """A session's member in an index bucket: its tag, then the storage id (64 hex
        digits) in base64url: 54 characters, under the 64 that Redis keeps a small sorted
        set compact for (zset-max-listpack-value)."""
        return tag + b64url(bytes.fromhex(storage_id))

    @staticmethod
    def storage_id_in(member: str) -> str:
        """The storage id an index member names (index_member's inverse)."""
        packed = member[TAG_LENGTH:]
        return base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)).hex()

    def legacy_index(self, kind: str, value: str) -> str:
        """Where releases before the bucketed indexes kept index `kind`: a sorted set of
        storage ids per value. Still read, and cleaned on sign-out and revocation, until
        those sessions have ended; written too while session.write_legacy_indexes is on
        (a rolling upgrade from such a release: its replicas find only these)."""
        return f"{self.prefix}:{kind}:{{{_hex(self.issuer, self.client_id, value)}}}"

    @property
    def invalidations(self) -> str:
        """The pub/sub channel on which a revoked or changed session is named, so that every
        process drops its cached copy (store.py)."""
        return f"{self.prefix}:invalidate"

    def attempt(self, state: str) -> str:
        return f"{self.prefix}:attempt:{{{_hex(state)}}}"

    def refresh_lock(self, storage_id: str) -> str:
        return f"{self.prefix}:lock:{{{storage_id}}}"

    def logout_jti(self, jti: str) -> str:
        return f"{self.prefix}:jti:{{{_hex(self.issuer, jti)}}}"

    def login_starts(self, bucket: str, window: int) -> str:
        return f"{self.prefix}:login-rate:{{{bucket}}}:{window}"

    def rate(self, route: str, kind: str, who: str) -> str:
        """A route's rate-limit bucket for one user, address, or (kind route) everyone."""
        return f"{self.prefix}:rate:{{{_hex(route, kind, who)}}}"
