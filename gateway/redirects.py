"""Decide whether a return URL (the `rd` parameter, a stored login target) is safe to redirect to.

Only same-origin absolute paths are accepted. The check is deliberately stricter than any URL
parser: browsers "fix up" backslashes, tabs, newlines and unicode slashes, so anything that a
browser might read as a scheme or an authority is refused, in raw, percent-decoded and
NFKC-normalised form. Pure: never imports aiohttp.web.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

_MAX_LENGTH = 4096
_DECODE_ROUNDS = 4  # enough for triple encoding; deeper nesting is refused outright
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _is_safe_form(value: str, *, decoded: bool = False) -> bool:
    if not value.startswith("/") or value.startswith(("//", "/\\")):
        return False  # open redirect: "//evil.com" and "/\evil.com" are authorities
    # Browsers drop tabs/newlines and turn "\" into "/"; a decoded space is only data.
    if "\\" in value or (_CONTROL if decoded else _CONTROL_OR_SPACE).search(value):
        return False
    # open redirect: unicode look-alikes (fullwidth "／", "＼", ...) normalise to "/" or "\"
    normalised = unicodedata.normalize("NFKC", value)
    return normalised == value or _is_safe_form(normalised, decoded=decoded)


def safe_return_path(value: str | None) -> str | None:
    """The value when it is a same-origin path (with query), else None."""
    if not value or len(value) > _MAX_LENGTH or not value.isascii():
        return None
    if not _is_safe_form(value):
        return None
    decoded = value
    for _ in range(_DECODE_ROUNDS):
        try:
            next_round = unquote(decoded, errors="strict")
        except UnicodeDecodeError:
            return None
        if next_round == decoded:
            break
        decoded = next_round
        # SECURITY: "/%2F%2Fevil.com" and "/%5Cevil.com" become authorities after a decode.
        if not _is_safe_form(decoded.split("?", 1)[0], decoded=True):
            return None
    else:
        return None
    path = value.split("?", 1)[0].split("#", 1)[0]
    if path == "/oauth2" or path.startswith("/oauth2/"):
        return None  # returning into the login endpoints would loop
    return value
