"""Decide what happens to a request on a route, given who (if anyone) is asking.

Pure: never imports aiohttp.web. `allow` rules: every kind that is present must match
(emails, email_domains, groups); within a kind any listed value matches. Emails count only
when the IdP says they are verified, and are compared as parsed addresses (identity.email_address:
exactly one '@', the domain in lower-case ASCII after IDNA); anything else matches no rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config_routes import AllowRules
from gateway.identity import Identity, email_address
from gateway.routing import Route


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


def decide(route: Route, identity: Identity | None) -> Decision:
    if route.auth == "public":
        return Allow(None)
    if identity is None:
        return Challenge()
    if route.allow is not None:
        reason = _refusal(route.allow, identity)
        if reason:
            return Deny(reason)
    return Allow(identity)


def _refusal(rules: AllowRules, identity: Identity) -> str | None:
    email = email_address(identity.email) if identity.email and identity.email_verified else None
    if rules.emails and email not in rules.emails:
        return "email not allowed" if email else "no verified, well-formed email"
    if rules.email_domains:
        domain = email.rpartition("@")[2] if email else None
        if domain not in rules.email_domains:
            return "email domain not allowed" if email else "no verified, well-formed email"
    if rules.groups and not set(rules.groups) & set(identity.groups):
        return "not in an allowed group"
    return None
