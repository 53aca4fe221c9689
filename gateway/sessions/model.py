"""The session and login-attempt records, and their versioned byte form.

Pure: never imports aiohttp.web. Records are JSON inside an AES-GCM envelope (see store.py);
the version field lets a later release read (or cleanly refuse) what an older one wrote.

A session record (version 3) is compressed with zlib behind a 0x03 byte. Inside: the
record's JSON, a newline, then the tokens' base64url segments as the bytes they spell. A JWT
(or any token of dot-separated base64url segments) is base64 text that zlib can barely
shrink; decoded, its header and payload are JSON that repeats the claims beside it (zlib
stores such a repeat in a few bytes), and its signature is a quarter smaller. A token is
stored so only when re-encoding its segments gives back exactly the same string (canonical
base64url), so what is read back is always byte for byte what the IdP issued; the segments
are never interpreted. The demo IdP's record went from 1,872 bytes of JSON to 1,235
compressed (version 2: the JSON alone, compressed) to about 910 (version 3). Compressing
before encrypting leaks nothing across users: a record holds one user's tokens, and only
that user's own User-Agent is theirs to choose. Records of versions 1 (plain JSON) and 2
(earlier releases) are still read.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from dataclasses import dataclass

from gateway.identity import Identity
from gateway.oidc.token_set import TokenSet
from gateway.sessions.cookies import b64url

_VERSION = 1  # login attempts, and session records of two releases ago
_COMPRESSED = b"\x02"  # the first byte of a version 2 session record (compressed JSON)
_PACKED = b"\x03"  # the first byte of a version 3 session record (JSON and token bytes)
_MARKERS = {_COMPRESSED: 2, _PACKED: 3}
_MAX_RECORD = 1 << 20  # what a session record may inflate to: far beyond any real one
_LENGTH = struct.Struct(">I")  # before each stored segment
_TOKENS = ("access_token", "id_token", "refresh_token")


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
        segments: list[bytes] = []
        tokens = {name: _pack(value, segments) if name in _TOKENS else value
                  for name, value in self.tokens.to_dict().items()}
        plain = json.dumps({"v": 3, "identity": self.identity.to_dict(), "tokens": tokens,
                            "created_at": self.created_at, "client_ip": self.client_ip,
                            "user_agent": self.user_agent}, separators=(",", ":")).encode()
        # json.dumps escapes every newline inside a string: the first one ends the JSON
        tail = b"".join(_LENGTH.pack(len(segment)) + segment for segment in segments)
        return _PACKED + zlib.compress(plain + b"\n" + tail)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Session:
        """ValueError (or KeyError, TypeError) for a record this release cannot read."""
        version = _MARKERS.get(raw[:1], _VERSION)
        segments: list[bytes] = []
        if version != _VERSION:
            raw = _inflate(raw[1:])
        if version == 3:
            raw, _, tail = raw.partition(b"\n")
            segments = _segments(tail)
        data = json.loads(raw)
        if data.get("v") != version:
            raise ValueError(f"unsupported session record version {data.get('v')!r}")
        tokens = data["tokens"]
        if version == 3:
            tokens = {name: _unpack(value, segments) if name in _TOKENS else value
                      for name, value in tokens.items()}
        return cls(Identity.from_dict(data["identity"]), TokenSet.from_dict(tokens),
                   float(data["created_at"]), str(data.get("client_ip", "-")),
                   str(data.get("user_agent", "-")))


def _inflate(compressed: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        plain = inflater.decompress(compressed, _MAX_RECORD)
    except zlib.error as exc:
        raise ValueError(f"session record does not inflate: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("session record is truncated or inflates too far")
    return plain


def _pack(token: object, segments: list[bytes]) -> object:
    """A token of dot-separated canonical base64url segments: the indexes of its segments'
    bytes (appended to `segments`); anything else as it is."""
    if not isinstance(token, str) or "." not in token:
        return token
    decoded = []
    for part in token.split("."):
        try:
            raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (binascii.Error, ValueError):
            return token
        if b64url(raw) != part:  # padding, other alphabets, non-zero spare bits: kept as text
            return token
        decoded.append(raw)
    first = len(segments)
    segments.extend(decoded)
    return list(range(first, len(segments)))


def _unpack(value: object, segments: list[bytes]) -> object:
    if not isinstance(value, list):
        return value
    if not all(isinstance(index, int) and 0 <= index < len(segments) for index in value):
        raise ValueError("session record names token bytes it does not hold")
    return ".".join(b64url(segments[index]) for index in value)


def _segments(tail: bytes) -> list[bytes]:
    segments, offset = [], 0
    while offset < len(tail):
        if offset + _LENGTH.size > len(tail):
            raise ValueError("session record's token bytes are truncated")
        (length,) = _LENGTH.unpack_from(tail, offset)
        offset += _LENGTH.size
        if offset + length > len(tail):
            raise ValueError("session record's token bytes are truncated")
        segments.append(tail[offset:offset + length])
        offset += length
    return segments


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
