"""The opaque session cookie: a random id and a random key, nothing else.

The id names the record (the backend only ever sees sha256(id)); the key decrypts it. Neither a
dump of the store nor the cookie alone yields the other half. Pure: never imports aiohttp.web.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from dataclasses import dataclass, field

ID_BYTES = 32  # 256-bit id + 256-bit key: 512 bits from `secrets` in all
KEY_BYTES = 32
_SHAPE = re.compile(r"^[A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True, slots=True)
class SessionCookie:
    session_id: bytes
    key: bytes
    # sha256(session_id), hex: the name the store knows the session by. Worked out once: a
    # signed-in request asks for it, and the session cache hands out the same cookie for
    # cache_ttl.
    storage_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage_id", hashlib.sha256(self.session_id).hexdigest())

    @classmethod
    def new(cls) -> SessionCookie:
        return cls(secrets.token_bytes(ID_BYTES), secrets.token_bytes(KEY_BYTES))

    @classmethod
    def parse(cls, value: str | None) -> SessionCookie | None:
        """None for anything that is not exactly a cookie we could have written."""
        if not value or not _SHAPE.fullmatch(value):
            return None
        head, _, tail = value.partition(".")
        try:
            return cls(_unb64(head), _unb64(tail))
        except (binascii.Error, ValueError):
            return None

    @property
    def value(self) -> str:
        return f"{b64url(self.session_id)}.{b64url(self.key)}"


def b64url(raw: bytes) -> str:
    """Unpadded base64url, the store's one spelling of bytes as text: the cookie's halves,
    a session record's token segments (model.py), an index member's storage id (keys.py)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    raw = base64.urlsafe_b64decode(text + "=")
    if b64url(raw) != text:  # non-canonical padding bits: refuse, so one id has one spelling
        raise ValueError("non-canonical base64")
    return raw


def value_in(header: str, name: str) -> str | None:
    """Cookie `name`'s value in a Cookie header: the last one, as aiohttp's request.cookies
    has it, but without parsing every other cookie into a Morsel (the signed-in request path
    reads only this one). Values are taken as sent: a quoted one is not the shape of ours."""
    prefix = name + "="
    if prefix not in header:
        return None
    found = None
    for pair in header.split(";"):
        pair = pair.strip()
        if pair.startswith(prefix):
            found = pair[len(prefix):]
    return found
