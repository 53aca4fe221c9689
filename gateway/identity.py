"""Who the user is, taken from validated ID token and userinfo claims.

The only place claim names are read. Pure: never imports aiohttp.web.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

import idna


@dataclass(frozen=True, slots=True)
class Identity:
    sub: str
    email: str | None = None
    email_verified: bool = False
    preferred_username: str | None = None
    groups: tuple[str, ...] = ()
    sid: str | None = None
    # Every claim the login saw (validated ID token, completed by userinfo), for policies on
    # claims; None in a session written before claims were kept (such a session must sign in
    # again before a claim rule can be decided for it).
    claims: Mapping[str, object] | None = field(default=None, hash=False)

    @classmethod
    def from_claims(cls, claims: Mapping[str, object], groups_claim: str) -> Identity:
        sub = _text(claims.get("sub"))
        if sub is None:
            raise ValueError("claims have no usable 'sub'")
        return cls(
            sub=sub,
            email=_text(claims.get("email")),
            # OIDC Core §5.1: only an explicit true counts; some IdPs send the string "true".
            email_verified=_is_true(claims.get("email_verified")),
            preferred_username=_text(claims.get("preferred_username")),
            groups=_groups(claims.get(groups_claim)),
            sid=_text(claims.get("sid")),
            claims=dict(claims),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "sub": self.sub,
            "email": self.email,
            "email_verified": self.email_verified,
            "preferred_username": self.preferred_username,
            "groups": list(self.groups),
            "sid": self.sid,
            "claims": dict(self.claims) if self.claims is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Identity:
        claims = data.get("claims")
        identity = cls.from_claims({**data, "groups": data.get("groups")}, "groups")
        kept = dict(claims) if isinstance(claims, dict) else None
        return dataclasses.replace(identity, claims=kept)


def wanted_claims(groups_claim: str) -> tuple[str, ...]:
    """The claims an Identity is made of, beyond sub: when the ID token lacks one, the login
    (and a refresh) asks userinfo for it."""
    return ("email", "preferred_username", groups_claim)


def claim_at(claims: Mapping[str, object], path: str) -> object:
    """The claim named `path`: a claim of that exact name (URL-named claims have dots), else
    the dotted path followed through objects; None when absent."""
    if path in claims:
        return claims[path]
    node: object = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
MAX_HEADER_VALUE = 4096  # longer values are not sent: servers refuse long header lines


@dataclass(frozen=True, slots=True)
class ClaimTemplate:
    """A header value made of claims (routes[].headers): "{department}", or
    "{given_name} {family_name}" with text between. Parsed once at startup."""

    parts: tuple[tuple[str, bool], ...]  # (text, True when it is a claim name or path)

    @classmethod
    def parse(cls, template: str) -> ClaimTemplate:
        """ValueError, saying what is wrong, for a template that is not one."""
        parts: list[tuple[str, bool]] = []
        end = 0
        for match in _PLACEHOLDER.finditer(template):
            parts.append((template[end:match.start()], False))
            path = match.group(1).strip()
            if not path.strip(".") or ".." in path:
                raise ValueError(f"{match.group(0)!r} names no claim")
            parts.append((path, True))
            end = match.end()
        parts.append((template[end:], False))
        text = "".join(part for part, is_claim in parts if not is_claim)
        if "{" in text or "}" in text:
            raise ValueError(f"{template!r}: a brace outside a {{claim}}")
        if not any(is_claim for _, is_claim in parts):
            raise ValueError(f"{template!r} names no {{claim}}")
        if not text.isprintable():
            raise ValueError(f"{template!r} has control characters")
        return cls(tuple((part, is_claim) for part, is_claim in parts if part or is_claim))

    def render(self, identity: Identity, *, unverified_email: bool = False) -> str | None:
        """The value, or None (no header) when a claim is missing or not a value a header
        can carry. SECURITY: as for the default headers, `email` only when verified, no
        control characters (a CR/LF would split the header), list elements with a comma
        dropped (they would read as two), and nothing over MAX_HEADER_VALUE."""
        out = []
        for part, is_claim in self.parts:
            if not is_claim:
                out.append(part)
                continue
            if part == "email" and not (identity.email_verified or unverified_email):
                return None
            text = _header_text(claim_at(identity.claims or {}, part))
            if text is None:
                return None
            out.append(text)
        value = "".join(out)
        return value if value.isprintable() and len(value) <= MAX_HEADER_VALUE else None


def _header_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return str(value) or None
    if isinstance(value, list):
        items = [str(v) for v in value if isinstance(v, str | int) and not isinstance(v, bool)]
        return ",".join(item for item in items if item and "," not in item) or None
    return None


def _is_true(value: object) -> bool:
    return value is True or value == "true"  # not `in (True, ...)`: 1 == True in Python


def _text(value: object) -> str | None:
    """A claim fit for a header value: control characters would split or break the header."""
    return value if isinstance(value, str) and value and value.isprintable() else None


def _groups(value: object) -> tuple[str, ...]:
    """Groups are sent upstream comma-separated, so a name with a comma would read as two
    groups there (`staff,admins`): such names are dropped, as are unprintable ones."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple):
        return ()
    names = (_text(str(v)) for v in values if isinstance(v, str | int))
    return tuple(name for name in names if name is not None and "," not in name)


_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def ascii_lower(text: str) -> str:
    """Lower case for A-Z only. SECURITY: str.lower() maps the Kelvin sign to 'k', turning a
    non-ASCII string into an ASCII one that another party never equates with it."""
    return text.translate(_ASCII_LOWER)


def email_domain(domain: str) -> str | None:
    """A mail domain as policy compares it: lower-case ASCII (IDNA, UTS #46 mapping, so
    `Bücher.DE` is `xn--bcher-kva.de`); None when it is no valid domain name."""
    if not domain or domain.endswith("."):
        return None
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None


@functools.lru_cache(maxsize=4096)
def email_address(value: str) -> str | None:
    """An email address as policy compares it, or None (never matches a rule) when it is not
    one: exactly one '@', a local part without whitespace or control characters (ASCII case
    folded only: str.lower() would map the Kelvin sign to 'k', turning one mailbox into
    another), and a valid domain (see email_domain)."""
    local, at, domain = value.rpartition("@")
    if not at or not local or "@" in local or not local.isprintable() or \
            any(c.isspace() for c in local):
        return None
    ascii_domain = email_domain(domain)
    return f"{ascii_lower(local)}@{ascii_domain}" if ascii_domain else None
