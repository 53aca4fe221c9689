"""Access decisions: public, challenge, allow rules (every kind present must match)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import AllowRules, RouteConfig
from gateway.identity import Identity
from gateway.policy import Allow, Challenge, Deny, decide
from gateway.routing import Route

ALICE = Identity("alice", "Alice@Example.COM", True, "alice", ("admins", "staff"))


def route(auth: str = "required", **allow: Any) -> Route:
    rules = AllowRules(**allow) if allow else None
    return Route.from_config(RouteConfig(name="r", upstream="http://u", auth=auth,  # type: ignore[arg-type]
                                         allow=rules))


def test_public_route_allows_anyone_without_identity() -> None:
    assert decide(route("public"), None) == Allow(None)
    assert decide(route("public"), ALICE) == Allow(None)  # identity never sent on public routes


def test_protected_route_without_identity_is_a_challenge() -> None:
    assert decide(route(), None) == Challenge()


def test_protected_route_without_rules_allows_any_signed_in_user() -> None:
    assert decide(route(), ALICE) == Allow(ALICE)


@pytest.mark.parametrize(("rules", "allowed"), [
    ({"emails": ["alice@example.com"]}, True),
    ({"emails": ["ALICE@example.com"]}, True),
    ({"emails": ["bob@example.com"]}, False),
    ({"email_domains": ["example.com"]}, True),
    ({"email_domains": ["Example.Com"]}, True),
    ({"email_domains": ["other.com"]}, False),
    ({"email_domains": ["ample.com"]}, False),
    ({"groups": ["admins"]}, True),
    ({"groups": ["nobody", "staff"]}, True),
    ({"groups": ["nobody"]}, False),
    ({"groups": ["Admins"]}, False),
    ({"email_domains": ["example.com"], "groups": ["admins"]}, True),
    ({"email_domains": ["example.com"], "groups": ["nobody"]}, False),
    ({"emails": ["bob@example.com"], "groups": ["admins"]}, False),
])
def test_allow_rules(rules: dict[str, list[str]], allowed: bool) -> None:
    decision = decide(route(**rules), ALICE)
    if allowed:
        assert decision == Allow(ALICE)
    else:
        assert isinstance(decision, Deny) and decision.reason


def test_unverified_email_never_matches_email_rules() -> None:
    """Account takeover: an IdP account claiming someone's email without verifying it."""
    unverified = Identity("mallory", "alice@example.com", False, None, ())
    for rules in ({"emails": ["alice@example.com"]}, {"email_domains": ["example.com"]}):
        decision = decide(route(**rules), unverified)
        assert isinstance(decision, Deny)
        assert decision.reason == "no verified email"


def test_identity_without_email_is_denied_by_email_rules() -> None:
    decision = decide(route(email_domains=["example.com"]), Identity("x"))
    assert isinstance(decision, Deny)
