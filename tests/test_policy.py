"""Access decisions: methods, public, challenge, deny before allow, allow rules (every kind
present must match), claims, named policies."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import config as config_module
from gateway.config import Config
from gateway.config_routes import RouteConfig, RuleConfig
from gateway.errors import ConfigError
from gateway.identity import Identity, claim_at
from gateway.policy import (
    Access,
    Allow,
    Challenge,
    Decision,
    Deny,
    StepUp,
    WrongMethod,
    is_preflight,
)
from gateway.policy import decide as decide_for
from gateway.routing import access_of

ALICE = Identity("alice", "Alice@Example.COM", True, "alice", ("admins", "staff"))


def route(auth: str = "required", **allow: Any) -> Access:
    """A route's access, compiled from its config as the app does."""
    rules = (RuleConfig(**allow),) if allow else None
    return access_of(RouteConfig(name="r", upstream="http://u", auth=auth,  # type: ignore[arg-type]
                                 allow=rules))


NOW = 1_800_000_000.0


def decide(access: Access, identity: Identity | None, method: str = "GET",
           now: float = NOW) -> Decision:
    return decide_for(access, identity, method, now)


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
        assert decision == Allow(ALICE, "routes[r].allow[0]")
    else:
        assert isinstance(decision, Deny) and decision.reason


def test_unverified_email_never_matches_email_rules() -> None:
    """Account takeover: an IdP account claiming someone's email without verifying it."""
    unverified = Identity("mallory", "alice@example.com", False, None, ())
    for rules in ({"emails": ["alice@example.com"]}, {"email_domains": ["example.com"]}):
        decision = decide(route(**rules), unverified)
        assert isinstance(decision, Deny)
        assert decision.reason.endswith(": no verified, well-formed email")


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


def claims_identity(**claims: Any) -> Identity:
    return Identity.from_claims({"sub": "carol", **claims}, "groups")


def compiled(**route: Any) -> Access:
    return access_of(RouteConfig(name="app", upstream="http://u", **route))


@pytest.mark.parametrize(("rule", "claims", "allowed"), [
    ({"department": "eng"}, {"department": "eng"}, True),
    ({"department": ["ops", "eng"]}, {"department": "eng"}, True),
    ({"department": "eng"}, {"department": "Eng"}, False),  # exact, as groups
    ({"department": "eng"}, {}, False),  # missing
    ({"realm_access.roles": "admin"}, {"realm_access": {"roles": ["user", "admin"]}}, True),
    ({"realm_access.roles": "admin"}, {"realm_access": {"roles": ["user"]}}, False),
    ({"realm_access.roles": "admin"}, {"realm_access": "admin"}, False),
    ({"realm_access.roles": "admin"}, {"realm_access": {"roles": {"admin": 1}}}, False),
    # a claim named with dots (Auth0's URL-named claims) is found by its whole name first
    ({"https://example.com/roles": "admin"}, {"https://example.com/roles": ["admin"]}, True),
    ({"mfa": True}, {"mfa": True}, True),
    ({"mfa": True}, {"mfa": "true"}, False),  # types are strict: no "true" for true
    ({"level": 1}, {"level": True}, False),  # and True is not 1
    ({"level": 1}, {"level": 1}, True),
    ({"department": "eng", "level": 2}, {"department": "eng", "level": 1}, False),
])
def test_claim_rules(rule: dict[str, Any], claims: dict[str, Any], allowed: bool) -> None:
    access = compiled(allow={"claims": rule})
    assert isinstance(decide(access, claims_identity(**claims)), Allow) is allowed


def test_claim_at_follows_dotted_paths_and_prefers_whole_names() -> None:
    claims = {"a.b": 1, "a": {"b": 2, "c": {"d": 3}}}
    assert claim_at(claims, "a.b") == 1
    assert claim_at(claims, "a.c.d") == 3
    assert claim_at(claims, "a.x") is None


def test_deny_is_checked_before_allow_and_names_its_rule() -> None:
    access = compiled(allow={"groups": ["staff"]},
                      deny=[{"emails": ["bob@example.com"]}, {"groups": ["contractors"]}])
    alice = Identity("alice", "alice@example.com", True, None, ("staff",))
    bob = Identity("bob", "bob@example.com", True, None, ("staff",))
    temp = Identity("tim", "tim@example.com", True, None, ("staff", "contractors"))
    assert decide(access, alice) == Allow(alice, "routes[app].allow[0]")
    assert decide(access, bob) == Deny("denied by routes[app].deny[0]", "routes[app].deny[0]")
    assert decide(access, temp) == Deny("denied by routes[app].deny[1]", "routes[app].deny[1]")


def test_deny_alone_lets_every_other_signed_in_user_in() -> None:
    access = compiled(deny={"groups": ["contractors"]})
    assert decide(access, Identity("x")) == Allow(Identity("x"))
    assert isinstance(decide(access, Identity("y", groups=("contractors",))), Deny)


def test_the_first_matching_allow_rule_decides() -> None:
    access = compiled(allow=[{"groups": ["admins"]}, {"email_domains": ["example.com"]}])
    both = Identity("a", "a@example.com", True, None, ("admins",))
    assert decide(access, both) == Allow(both, "routes[app].allow[0]")
    staff = Identity("s", "s@example.com", True)
    assert decide(access, staff) == Allow(staff, "routes[app].allow[1]")
    decision = decide(access, Identity("o", "o@other.com", True))
    assert isinstance(decision, Deny) and decision.rule == "routes[app].allow"
    assert decision.reason == ("routes[app].allow[0]: in no listed group; "
                               "routes[app].allow[1]: email domain not listed")


@pytest.mark.parametrize(("method", "expected"), [
    ("GET", "allow"), ("HEAD", "allow"), ("POST", "deny"), ("DELETE", "deny")])
def test_rules_limited_to_methods(method: str, expected: str) -> None:
    """Staff may read, admins may do anything; GET brings HEAD."""
    access = compiled(allow=[{"groups": ["staff"], "methods": ["get"]}, {"groups": ["admins"]}],
                      deny={"methods": ["DELETE"], "groups": ["interns"]})
    staff = Identity("s", groups=("staff",))
    assert type(decide(access, staff, method)).__name__.lower() == expected
    admin = Identity("a", groups=("admins",))
    assert isinstance(decide(access, admin, method), Allow)
    intern_admin = Identity("i", groups=("admins", "interns"))
    assert isinstance(decide(access, intern_admin, method),
                      Deny if method == "DELETE" else Allow)


def test_route_methods_refuse_the_others_before_anything_else() -> None:
    for auth in ("required", "public"):
        access = compiled(auth=auth, methods=["GET", "POST"])
        assert decide(access, None, "PUT") == WrongMethod(frozenset({"GET", "HEAD", "POST"}))
        assert decide(access, None, "HEAD") != WrongMethod(frozenset({"GET", "HEAD", "POST"}))


def test_a_session_without_kept_claims_signs_in_again_for_claim_rules() -> None:
    """Sessions written before claims were kept: a claim rule (allow or deny) cannot be
    decided for them, so they sign in again (fail closed, never a pass)."""
    old = Identity("old", groups=("staff",))  # claims None, as read from an older record
    assert decide(compiled(allow={"claims": {"dept": "eng"}}), old) == Challenge()
    assert decide(compiled(deny={"claims": {"dept": "sales"}}), old) == Challenge()
    # rules that need no claims still decide, and a rule for other methods does not count
    assert isinstance(decide(compiled(allow={"groups": ["staff"]}), old), Allow)
    assert isinstance(decide(compiled(deny={"claims": {"dept": "x"}, "methods": ["POST"]}),
                             old, "GET"), Allow)


def test_named_policies_are_shared_and_labelled_by_their_name() -> None:
    config = Config.model_validate({
        "server": {"public_url": "https://gw.example.com"},
        "oidc": {"issuer": "https://idp.example.com", "client_id": "c", "client_secret": "s"},
        "policies": {"admins-only": {"allow": {"groups": ["admins"]}}},
        "routes": [{"name": "a", "path_prefix": "/a", "upstream": "http://u",
                    "policy": "admins-only"},
                   {"name": "b", "path_prefix": "/b", "upstream": "http://u",
                    "policy": "admins-only"}]})
    for route_config in config.routes:
        access = access_of(route_config, config.policies)
        admin = Identity("x", groups=("admins",))
        assert decide(access, admin) == Allow(admin, "policies.admins-only.allow[0]")
        assert isinstance(decide(access, Identity("y")), Deny)


@pytest.mark.parametrize(("route", "message"), [
    ({"policy": "nope"}, "routes[app].policy: no policy named 'nope' under policies (none"),
    ({"policy": "p", "allow": {"groups": ["x"]}}, "routes[app]: policy names rules kept"),
    ({"auth": "public", "deny": {"groups": ["x"]}}, "routes[app]: allow, deny and policy need"),
    ({"allow": {}}, "routes[app].allow[0]: a rule needs at least one of"),
    ({"allow": {"claims": {"a": []}}}, "routes[app].allow[0]: a claim rule needs at least one"),
    ({"allow": {"claims": {"a..b": "x"}}}, "'a..b' is not a claim name or dotted path"),
    ({"allow": {"claims": {"a": 1.5}}},
     "routes[app].allow[0].claims: a: values are strings, integers or true/false"),
    ({"allow": {"methods": ["GE T"]}}, "'GE T' is not an HTTP method name"),
    ({"methods": []}, "routes[app].methods: lists no method"),
    ({"allow": {"scopes": ["a b"]}}, "'a b' is not an OAuth scope"),
    ({"allow": {"scopes": ['say"hi']}}, "is not an OAuth scope"),
    ({"bearer": True}, "routes[app].bearer: needs api.audiences (or the route's audiences)"),
    ({"audiences": ["https://api"]}, "routes[app]: audiences are for routes with bearer: true"),
    ({"auth": "public", "bearer": True, "audiences": ["x"]},
     "routes[app]: bearer and allow_preflight are for auth: required routes"),
    ({"auth": "public", "allow_preflight": True}, "bearer and allow_preflight are for auth"),
])
def test_policy_config_errors_name_the_key(route: dict[str, Any], message: str) -> None:
    raw = {"server": {"public_url": "https://gw.example.com"},
           "oidc": {"issuer": "https://idp.example.com", "client_id": "c",
                    "client_secret": "${S}"},
           "routes": [{"name": "app", "upstream": "http://u", **route}]}
    with pytest.raises(ConfigError) as caught:
        config_module.parse(raw, {"S": "secret"})
    assert message in str(caught.value)


def signed_in(**claims: Any) -> Identity:
    return Identity.from_claims({"sub": "u", **claims}, "groups")


@pytest.mark.parametrize(("route", "claims", "expected"), [
    ({"max_auth_age": "15m"}, {"auth_time": NOW - 60}, None),
    ({"max_auth_age": "15m"}, {"auth_time": NOW - 901}, StepUp(900, ())),
    ({"max_auth_age": "15m"}, {}, StepUp(900, ())),  # no auth_time: cannot show it
    ({"max_auth_age": "15m"}, {"auth_time": True}, StepUp(900, ())),
    ({"max_auth_age": "15m"}, {"auth_time": "1800000000"}, StepUp(900, ())),
    ({"acr_values": ["urn:mfa", "urn:hw"]}, {"acr": "urn:hw"}, None),
    ({"acr_values": ["urn:mfa"]}, {"acr": "urn:pwd"}, StepUp(None, ("urn:mfa",))),
    ({"acr_values": ["urn:mfa"]}, {}, StepUp(None, ("urn:mfa",))),
    ({"max_auth_age": "1h", "acr_values": ["urn:mfa"]}, {"auth_time": NOW, "acr": "urn:pwd"},
     StepUp(3600, ("urn:mfa",))),
])
def test_step_up_when_the_sign_in_is_too_old_or_too_weak(
        route: dict[str, Any], claims: dict[str, Any], expected: StepUp | None) -> None:
    identity = signed_in(**claims)
    decision = decide(compiled(**route), identity)
    assert decision == (expected or Allow(identity))


def test_step_up_only_for_users_the_rules_let_in() -> None:
    """A refused user is refused, not sent to sign in more strongly first."""
    access = compiled(max_auth_age="5m", allow={"groups": ["admins"]})
    assert isinstance(decide(access, signed_in(auth_time=0)), Deny)
    assert isinstance(decide(access, signed_in(auth_time=0, groups=["admins"])), StepUp)


def test_a_session_without_kept_claims_steps_up() -> None:
    assert decide(compiled(max_auth_age="5m"), Identity("old")) == StepUp(300, ())


@pytest.mark.parametrize(("claims", "allowed"), [
    ({"scope": "read write"}, True),
    ({"scope": "write"}, True),
    ({"scope": "read"}, False),
    ({"scope": "readwrite"}, False),
    ({"scp": "read write"}, True),  # Entra ID's name, space-separated
    ({"scp": ["read", "write"]}, True),  # Okta's, a list
    ({"scp": ["read"]}, False),
    ({}, False),  # a browser session has no scope
])
def test_scope_rules_match_a_granted_scope(claims: dict[str, Any], allowed: bool) -> None:
    identity = signed_in(**claims)
    decision = decide(compiled(allow={"scopes": ["write", "admin"]}), identity)
    if allowed:
        assert decision == Allow(identity, "routes[app].allow[0]")
    else:
        assert isinstance(decision, Deny)
        assert decision.scopes == ("write", "admin")  # what to say in insufficient_scope


def test_a_denial_on_other_kinds_lists_no_scope() -> None:
    access = compiled(allow=[{"groups": ["admins"]}, {"scopes": ["write"]}])
    decision = decide(access, signed_in(scope="write"))
    assert isinstance(decision, Allow)
    decision = decide(compiled(allow={"groups": ["admins"], "scopes": ["x"]}),
                      signed_in(scope="x"))
    assert isinstance(decision, Deny) and decision.scopes == ()


def test_preflights_pass_only_where_the_route_allows_them() -> None:
    access = compiled(allow_preflight=True, methods=["GET"], allow={"groups": ["admins"]})
    assert decide_for(access, None, "OPTIONS", NOW, preflight=True) == \
        Allow(None, "allow_preflight")
    assert decide_for(access, None, "OPTIONS", NOW) == WrongMethod(frozenset({"GET", "HEAD"}))
    assert decide_for(compiled(), None, "OPTIONS", NOW, preflight=True) == Challenge()


@pytest.mark.parametrize(("method", "origin", "request_method", "expected"), [
    ("OPTIONS", True, True, True),
    ("OPTIONS", True, False, False),
    ("OPTIONS", False, True, False),
    ("GET", True, True, False),
])
def test_what_a_preflight_is(method: str, origin: bool, request_method: bool,
                             expected: bool) -> None:
    assert is_preflight(method, origin, request_method) is expected
