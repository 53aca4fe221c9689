"""The session and login-attempt records, and their versioned byte form.

Pure: never imports aiohttp.web. Records are JSON inside an AES-GCM envelope (see store.py);
the version field lets a later release read (or cleanly refuse) what an older one wrote.

A session record (version 2) is its JSON compressed with zlib behind a 0x02 byte: tokens
and claims are base64 and repeat each other, and the record is a third smaller for it (1,872
bytes of JSON from the demo IdP became 1,235), in Redis and on every read. Compressing
before encrypting leaks nothing across users: a record holds one user's tokens, and only
that user's own User-Agent is theirs to choose. Version 1 records (plain JSON, from the
previous release) are still read.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

from gateway.identity import Identity
from gateway.oidc.token_set import TokenSet

_VERSION = 1  # login attempts, and session records of the previous release
_SESSION_VERSION = 2
_COMPRESSED = b"\x02"  # the first byte of a version 2 session record
_MAX_RECORD = 1 << 20  # what a session record may inflate to: far beyond any real one


@dataclass(frozen=True, slots=True)
class Session:
    identity: Identity
    tokens: TokenSet
    created_at: float
    client_ip: str = "-"
    user_agent: str = "-"

    def expires_at(self, max_lifetime: float) -> float:
        return self.created_at + max_lifetime

    def to_bytes(self) -> bytes:
        plain = json.dumps({"v": _SESSION_VERSION, "identity": self.identity.to_dict(),
                            "tokens": self.tokens.to_dict(), "created_at": self.created_at,
                            "client_ip": self.client_ip, "user_agent": self.user_agent},
                           separators=(",", ":")).encode()
        return _COMPRESSED + zlib.compress(plain)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Session:
        """ValueError (or KeyError, TypeError) for a record this release cannot read."""
        version = _VERSION
        if raw.startswith(_COMPRESSED):
            inflater = zlib.decompressobj()
            try:
                raw = inflater.decompress(raw[1:], _MAX_RECORD)
            except zlib.error as exc:
                raise ValueError(f"session record does not inflate: {exc}") from None
            if inflater.unconsumed_tail or not inflater.eof:
                raise ValueError("session record is truncated or inflates too far")
            version = _SESSION_VERSION
        data = json.loads(raw)
        if data.get("v") != version:
            raise ValueError(f"unsupported session record version {data.get('v')!r}")
        return cls(Identity.from_dict(data["identity"]), TokenSet.from_dict(data["tokens"]),
                   float(data["created_at"]), str(data.get("client_ip", "-")),
                   str(data.get("user_agent", "-")))


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """What the callback needs to finish a login that this browser started."""

    nonce: str
    code_verifier: str
    return_to: str
    browser_binding: str  # sha256 hex of the binding cookie set at /oauth2/start
    # A step-up: what the request asked the IdP for, which the ID token must then meet.
    max_age: int | None = None
    acr_values: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        return json.dumps({"v": _VERSION, "nonce": self.nonce, "verifier": self.code_verifier,
                           "rd": self.return_to, "binding": self.browser_binding,
                           "max_age": self.max_age, "acr_values": list(self.acr_values)}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LoginAttempt:
        data = json.loads(raw)
        if data.get("v") != _VERSION:
            raise ValueError("unsupported login attempt version")
        max_age = data.get("max_age")
        return cls(data["nonce"], data["verifier"], data["rd"], data["binding"],
                   max_age if isinstance(max_age, int) else None,
                   tuple(str(v) for v in data.get("acr_values") or ()))
