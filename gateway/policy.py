"""Decide what happens to a request on a route, given who (if anyone) is asking.

Pure: never imports aiohttp.web, and works on its own frozen types (`Access`, `Rules`), which
routing.access_of compiles once from the config, never on pydantic models. `allow` rules:
every kind that is present must match (emails, email_domains, groups); within a kind any listed
value matches. Emails count only when the IdP says they are verified, and are compared as
parsed addresses (identity.email_address: exactly one '@', the domain in lower-case ASCII after
IDNA); anything else matches no rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.identity import Identity, email_address


@dataclass(frozen=True, slots=True)
class Rules:
    """Allow rules, already parsed: addresses and domains as identity.email_address makes
    them, groups exactly as the IdP spells them."""

    emails: frozenset[str] = frozenset()
    email_domains: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use a route: anyone (public: no identity is ever sent), or signed-in users,
    all of them or those the rules allow."""

    public: bool
    rules: Rules | None = None


@dataclass(frozen=True, slots=True)
class Allow:
    identity: Identity | None


@dataclass(frozen=True, slots=True)
class Challenge:
    """No session on a protected route: start a login (browser) or answer 401 (API)."""


@dataclass(frozen=True, slots=True)
class Deny:
    reason: str


Decision = Allow | Challenge | Deny


def decide(access: Access, identity: Identity | None) -> Decision:
    if access.public:
        return Allow(None)
    if identity is None:
        return Challenge()
    if access.rules is not None:
        reason = _refusal(access.rules, identity)
        if reason:
            return Deny(reason)
    return Allow(identity)


def _refusal(rules: Rules, identity: Identity) -> str | None:
    email = email_address(identity.email) if identity.email and identity.email_verified else None
    if rules.emails and email not in rules.emails:
        return "email not allowed" if email else "no verified, well-formed email"
    if rules.email_domains:
        domain = email.rpartition("@")[2] if email else None
        if domain not in rules.email_domains:
            return "email domain not allowed" if email else "no verified, well-formed email"
    if rules.groups and rules.groups.isdisjoint(identity.groups):
        return "not in an allowed group"
    return None
