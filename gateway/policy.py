"""Decide what happens to a request on a route, given who (if anyone) is asking and how.

Pure: never imports aiohttp.web, and works on its own frozen types (`Access`, `Rule`), which
routing.access_of compiles once from the config, never on pydantic models.

The order, for a request with method M on a route:
0. a CORS preflight (OPTIONS with Origin and Access-Control-Request-Method) on a route with
   `allow_preflight` goes through with no identity: browsers never send credentials on one;
1. the route's `methods`, when it lists them: any other method is refused (405), signed in
   or not;
2. a public route allows anyone, and no identity is ever sent;
3. without a signed-in user: a challenge (sign in);
4. `deny` rules, in order: the first that applies to M and matches the user refuses (403);
5. `allow` rules, in order: the first that applies to M and matches allows; none: 403. A
   route without allow rules allows every signed-in user (that deny let through).
A rule matches when every kind it lists matches: emails (verified only, compared as parsed
addresses: identity.email_address), email_domains, groups (exact names), claims (a claim, or a
dotted path into one, equal to a listed value or, for a list claim, holding one), scopes
(one of them granted to a bearer token: its `scope` claim, or `scp`). A rule
with `methods` applies only to those. A rule on claims cannot be decided for a session written
before claims were kept: that is a challenge too (the new sign-in keeps them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from gateway.identity import Identity, claim_at, email_address


@dataclass(frozen=True, slots=True)
class Rule:
    """One allow or deny rule, parsed: addresses and domains as identity.email_address makes
    them, groups and claim values exactly as the IdP spells them."""

    label: str  # where it is written, for the log: "routes[app].allow[0]"
    emails: frozenset[str] = frozenset()
    email_domains: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    claims: tuple[tuple[str, tuple[object, ...]], ...] = ()
    methods: frozenset[str] = frozenset()  # empty: every method
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use a route: anyone (public), or signed-in users the rules let in."""

    public: bool
    allow: tuple[Rule, ...] | None = None  # None: every signed-in user
    deny: tuple[Rule, ...] = ()
    methods: frozenset[str] | None = None  # None: every method
    max_auth_age: float | None = None  # step-up: a sign-in no older than this
    acr_values: tuple[str, ...] = ()  # step-up: a sign-in of one of these strengths
    allow_preflight: bool = False  # CORS preflights pass without credentials


class Allow(NamedTuple):
    """(Decided for nearly every request: a named tuple, built in C, as pipeline.Principal
    is; the refusals stay frozen dataclasses.)"""

    identity: Identity | None
    rule: str | None = None  # the allow rule that matched, when the route has any


@dataclass(frozen=True, slots=True)
class Challenge:
    """No usable session on a protected route: sign in (browser) or answer 401 (API)."""


@dataclass(frozen=True, slots=True)
class Deny:
    reason: str
    rule: str | None = None  # the deny rule that matched, or the allow list none matched
    scopes: tuple[str, ...] = ()  # scopes that allow rules refused for lack of (RFC 6750)


@dataclass(frozen=True, slots=True)
class StepUp:
    """Allowed, but the sign-in is too old or too weak for this route: sign in again, asking
    the IdP for these (Core §3.1.2.1), or 401 insufficient_user_authentication (RFC 9470)."""

    max_age: int | None
    acr_values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WrongMethod:
    """The route does not take this method at all (405, whoever asks)."""

    allowed: frozenset[str]


Decision = Allow | Challenge | Deny | StepUp | WrongMethod


def takes(access: Access, method: str) -> bool:
    """Does the route take this method at all? (Known before anyone is looked up.)"""
    return access.methods is None or method in access.methods


def decide(access: Access, identity: Identity | None, method: str, now: float, *,
           preflight: bool = False) -> Decision:
    """`preflight`: the request is a CORS preflight (see is_preflight)."""
    if preflight and access.allow_preflight:
        return Allow(None, "allow_preflight")
    decision = _decide(access, identity, method)
    if isinstance(decision, Allow) and decision.identity is not None:
        return _fresh_enough(access, decision.identity, now) or decision
    return decision


def is_preflight(method: str, has_origin: bool, has_request_method: bool) -> bool:
    """A CORS preflight (Fetch standard §3.2.2): OPTIONS with Origin and
    Access-Control-Request-Method."""
    return method == "OPTIONS" and has_origin and has_request_method


def step_up_of(access: Access) -> StepUp | None:
    """What a sign-in for this route must ask the IdP for; None: nothing special."""
    if access.max_auth_age is None and not access.acr_values:
        return None
    return StepUp(int(access.max_auth_age) if access.max_auth_age is not None else None,
                  access.acr_values)


def _fresh_enough(access: Access, identity: Identity, now: float) -> StepUp | None:
    """A step-up when the route wants a newer or stronger sign-in than the session's. A
    session without kept claims (an older release's) cannot show either: it steps up."""
    step_up = step_up_of(access)
    if step_up is None:
        return None
    claims = identity.claims
    if claims is None:
        return step_up
    if access.max_auth_age is not None:
        auth_time = claims.get("auth_time")
        if isinstance(auth_time, bool) or not isinstance(auth_time, int | float) \
                or now - auth_time > access.max_auth_age:
            return step_up
    acr = claims.get("acr")
    if access.acr_values and (not isinstance(acr, str) or acr not in access.acr_values):
        return step_up
    return None


def _decide(access: Access, identity: Identity | None, method: str) -> Decision:
    if access.methods is not None and method not in access.methods:
        return WrongMethod(access.methods)
    if access.public:
        return Allow(None)
    if identity is None:
        return Challenge()
    if access.allow is None and not access.deny:  # any signed-in user: nothing to weigh
        return Allow(identity)
    applicable_deny = [rule for rule in access.deny if _applies(rule, method)]
    applicable_allow = [rule for rule in access.allow or () if _applies(rule, method)]
    if identity.claims is None and any(rule.claims for rule in applicable_deny
                                       + applicable_allow):
        return Challenge()  # a session from before claims were kept
    for rule in applicable_deny:
        if _mismatch(rule, identity) is None:
            return Deny(f"denied by {rule.label}", rule.label)
    if access.allow is None:
        return Allow(identity)
    reasons: list[str] = []
    scopes: list[str] = []
    for rule in access.allow:
        if rule not in applicable_allow:
            reasons.append(f"{rule.label}: not for {method}")
            continue
        mismatch = _mismatch(rule, identity)
        if mismatch is None:
            return Allow(identity, rule.label)
        reasons.append(f"{rule.label}: {mismatch}")
        if mismatch == _NO_SCOPE:
            scopes.extend(rule.scopes)
    return Deny("; ".join(reasons), access.allow[0].label.rpartition("[")[0]
                if access.allow else None, tuple(dict.fromkeys(scopes)))


def _applies(rule: Rule, method: str) -> bool:
    return not rule.methods or method in rule.methods


def _mismatch(rule: Rule, identity: Identity) -> str | None:
    """Why `identity` does not match `rule`; None when it does."""
    email = email_address(identity.email) if identity.email and identity.email_verified else None
    if rule.emails and email not in rule.emails:
        return "email not listed" if email else "no verified, well-formed email"
    if rule.email_domains:
        domain = email.rpartition("@")[2] if email else None
        if domain not in rule.email_domains:
            return "email domain not listed" if email else "no verified, well-formed email"
    if rule.groups and rule.groups.isdisjoint(identity.groups):
        return "in no listed group"
    for path, wanted in rule.claims:
        if not _claim_matches(claim_at(identity.claims or {}, path), wanted):
            return f"claim {path} has no listed value"
    if rule.scopes and not set(rule.scopes) & scopes_of(identity):
        return _NO_SCOPE
    return None


_NO_SCOPE = "no listed scope"


def scopes_of(identity: Identity) -> frozenset[str]:
    """The scopes granted to a bearer token: RFC 9068's `scope` (space-separated), or the
    `scp` some IdPs use (space-separated, or a list). A browser session has none."""
    claims = identity.claims or {}
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            return frozenset(value.split())
        if isinstance(value, list):
            return frozenset(item for item in value if isinstance(item, str))
    return frozenset()


def _claim_matches(value: object, wanted: tuple[object, ...]) -> bool:
    """Equal to a wanted value, or a list holding one; strict about types (True is not 1,
    "1" is not 1)."""
    values = value if isinstance(value, list) else [value]
    return any(type(v) is type(w) and v == w for v in values for w in wanted)
