"""Access decisions: public, challenge, allow rules (every kind present must match)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config_routes import AllowRules, RouteConfig
from gateway.identity import Identity
from gateway.policy import Access, Allow, Challenge, Deny, decide
from gateway.routing import access_of

ALICE = Identity("alice", "Alice@Example.COM", True, "alice", ("admins", "staff"))


def route(auth: str = "required", **allow: Any) -> Access:
    """A route's access, compiled from its config as the app does."""
    rules = AllowRules(**allow) if allow else None
    return access_of(RouteConfig(name="r", upstream="http://u", auth=auth,  # type: ignore[arg-type]
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
        assert decision.reason == "no verified, well-formed email"


@pytest.mark.parametrize("email", [
    "alice@example.com@evil.com",  # two '@': which domain is it?
    "alice@evil.com@example.com",
    "@example.com",
    "alice@",
    "alice",
    "al ice@example.com",
    "alice@example.com.",
    "alice@exa mple.com",
    "alice@evil.com\n@example.com",
])
def test_an_email_that_is_not_one_address_matches_no_email_rule(email: str) -> None:
    """Parser confusion: the domain compared must be the address's one domain."""
    identity = Identity("mallory", email, True, None, ())
    for rules in ({"emails": ["alice@example.com"]}, {"email_domains": ["example.com"]}):
        decision = decide(route(**rules), identity)
        assert isinstance(decision, Deny), (email, rules)


@pytest.mark.parametrize(("email", "domain_rule", "allowed"), [
    ("bob@Bücher.DE", "xn--bcher-kva.de", True),  # IDNA: one domain, two spellings
    ("bob@xn--bcher-kva.de", "bücher.de", True),
    ("bob@ＥＸＡＭＰＬＥ.com", "example.com", True),  # fullwidth maps to ASCII in IDNA
    ("bob@buecher.de", "bücher.de", False),
])
def test_email_domains_compare_in_lower_case_ascii_after_idna(
        email: str, domain_rule: str, allowed: bool) -> None:
    identity = Identity("bob", email, True, None, ())
    assert isinstance(decide(route(email_domains=[domain_rule]), identity), Allow) is allowed


def test_the_local_part_folds_ascii_case_only() -> None:
    """The Kelvin sign (U+212A) lower-cases to 'k' in Python: \u212aim is not kim's mailbox."""
    rule = route(emails=["kim@example.com"])
    assert isinstance(decide(rule, Identity("k", "KIM@example.com", True)), Allow)
    assert isinstance(decide(rule, Identity("k", "\u212aim@example.com", True)), Deny)


def test_identity_without_email_is_denied_by_email_rules() -> None:
    decision = decide(route(email_domains=["example.com"]), Identity("x"))
    assert isinstance(decision, Deny)
