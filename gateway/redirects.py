"""Decide whether a return URL (the `rd` parameter, a stored login target) is safe to redirect to.

Same-origin absolute paths are accepted, and, for sites behind a forward-auth front on other
hosts, absolute http(s) URLs whose host is on the operator's allow-list
(`server.redirect_domains`). The check is deliberately stricter than any URL parser: browsers
"fix up" backslashes, tabs, newlines and unicode slashes, so anything that a browser might read
as a scheme or an authority is refused, in raw, percent-decoded and NFKC-normalised form. An
absolute URL must be spelled plainly (scheme, a host name of letters, digits, dots and
hyphens, an optional port, then a path that passes the same-origin check): no user info, no
IP literal, no escapes or look-alikes in the authority. Pure: never imports aiohttp.web.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

_MAX_LENGTH = 4096
_DECODE_ROUNDS = 4  # enough for triple encoding; deeper nesting is refused outright
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# scheme://host[:port] then a path (or nothing): the whole authority in one plain shape.
_ABSOLUTE = re.compile(r"(https?)://([a-z0-9.-]{1,253})(?::([0-9]{1,5}))?(/.*)?",
                       re.DOTALL | re.IGNORECASE)
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


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


def domain_allowed(host: str, domains: tuple[str, ...]) -> bool:
    """`host` (lower case) is listed exactly, or under a listed `.domain` (a dot boundary:
    `.example.com` covers `app.example.com`, never `evilexample.com` nor `example.com`)."""
    return any(host == domain or (domain.startswith(".") and host.endswith(domain))
               for domain in domains)


def safe_return_url(value: str | None, *, public_origin: str,
                    domains: tuple[str, ...] = ()) -> str | None:
    """The return target to redirect to: a same-origin path as it was given, or an absolute
    URL on the gateway's own origin (as a path) or on an allowed domain (normalised: scheme
    and host in lower case, no default port); None when it is neither."""
    path = safe_return_path(value)
    if path is not None or value is None or len(value) > _MAX_LENGTH or not value.isascii():
        return path
    match = _ABSOLUTE.fullmatch(value)
    if match is None:
        return None
    scheme, host, port, rest = match.group(1).lower(), match.group(2).lower(), match.group(3), \
        match.group(4) or "/"
    if port is not None and not 0 < int(port) < 65536:
        return None
    default = "443" if scheme == "https" else "80"
    authority = host if port in (None, default) else f"{host}:{int(port)}"
    checked = safe_return_path(rest)
    if checked is None:
        return None
    origin = f"{scheme}://{authority}"
    if origin == public_origin:
        return checked
    if not all(_LABEL.fullmatch(label) for label in host.split(".")) or \
            host.replace(".", "").isdigit() or not domain_allowed(host, domains):
        return None  # an odd label ("a..b", "-a"), a numeric (IP-like) host, or not listed
    if public_origin.startswith("https://") and scheme != "https":
        return None  # never from an https gateway down to plain http
    return origin + checked
