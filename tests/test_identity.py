"""Identity from claims: the only place claim names are read."""

from __future__ import annotations

import dataclasses
import re

import pytest

from gateway.identity import ClaimTemplate, Identity


def test_identity_from_claims() -> None:
    identity = Identity.from_claims({"sub": "u1", "email": "a@x", "email_verified": True,
                                     "preferred_username": "a", "roles": ["r1", "r2"],
                                     "sid": "s"}, "roles")
    assert identity == Identity("u1", "a@x", True, "a", ("r1", "r2"), "s",
                                claims={"sub": "u1", "email": "a@x", "email_verified": True,
                                        "preferred_username": "a", "roles": ["r1", "r2"],
                                        "sid": "s"})


def test_identity_keeps_its_claims_through_the_session_record() -> None:
    identity = Identity.from_claims({"sub": "u", "realm_access": {"roles": ["admin"]}}, "g")
    assert Identity.from_dict(identity.to_dict()) == identity
    older = {k: v for k, v in identity.to_dict().items() if k != "claims"}
    assert Identity.from_dict(older).claims is None  # written before claims were kept


@pytest.mark.parametrize(("value", "verified"), [
    (True, True), ("true", True), (False, False), ("false", False), (None, False), (1, False),
])
def test_email_verified_counts_only_when_explicitly_true(value: object, verified: bool) -> None:
    identity = Identity.from_claims({"sub": "u", "email_verified": value}, "g")
    assert identity.email_verified is verified


@pytest.mark.parametrize(("value", "groups"), [
    (["a", "b"], ("a", "b")), ("solo", ("solo",)), ("", ()), (None, ()), ({"a": 1}, ()),
    (["a", 7, None, ""], ("a", "7")),
    (["staff,admins", "ops"], ("ops",)),  # would read as two groups upstream
    (["ok", "bad\r\nX-Forwarded-User: root"], ("ok",)),
])
def test_groups_claim_shapes(value: object, groups: tuple[str, ...]) -> None:
    assert Identity.from_claims({"sub": "u", "groups": value}, "groups").groups == groups


def test_claims_that_would_break_a_header_value_are_left_out() -> None:
    identity = Identity.from_claims({"sub": "u", "email": "a@x\r\nX-Evil: 1",
                                     "preferred_username": "tab\there"}, "groups")
    assert identity.email is None and identity.preferred_username is None


@pytest.mark.parametrize("claims", [{}, {"sub": ""}, {"sub": 5}, {"sub": "u\n"}])
def test_sub_is_required(claims: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="sub"):
        Identity.from_claims(claims, "groups")


def test_dict_round_trip() -> None:
    identity = Identity("u", "e@x", True, "p", ("g",), "sid")
    assert Identity.from_dict(identity.to_dict()) == identity


CAROL = Identity.from_claims({
    "sub": "carol", "email": "carol@example.com", "email_verified": True,
    "given_name": "Carol", "family_name": "Ng", "department": "eng", "level": 3, "mfa": True,
    "realm_access": {"roles": ["admin", "a,b", "user", 7, True, {"x": 1}]},
    "bad": "x\r\nX-Forwarded-User: root", "long": "x" * 5000, "nested": {"a": 1}}, "groups")


@pytest.mark.parametrize(("template", "value"), [
    ("{department}", "eng"),
    ("{given_name} {family_name}", "Carol Ng"),
    ("dept={department};level={level}", "dept=eng;level=3"),
    ("{mfa}", "true"),
    ("{realm_access.roles}", "admin,user,7"),  # the comma'd element, true and {} dropped
    ("{ email }", "carol@example.com"),
    ("{missing}", None),  # a missing claim: no header, not an empty one
    ("{department} {missing}", None),
    ("{nested}", None),  # an object is no header value
    ("{bad}", None),  # CR/LF would split the header
    ("{long}", None),  # over MAX_HEADER_VALUE
])
def test_claim_templates_render_header_values(template: str, value: str | None) -> None:
    assert ClaimTemplate.parse(template).render(CAROL) == value


def test_claim_templates_send_an_email_only_when_verified() -> None:
    unverified = dataclasses.replace(CAROL, email_verified=False)
    template = ClaimTemplate.parse("{email}")
    assert template.render(unverified) is None
    assert template.render(unverified, unverified_email=True) == "carol@example.com"


def test_a_session_without_kept_claims_renders_nothing() -> None:
    assert ClaimTemplate.parse("{department}").render(Identity("old")) is None


@pytest.mark.parametrize(("template", "problem"), [
    ("plain text", "names no {claim}"),
    ("{}", "names no claim"),
    ("{a..b}", "names no claim"),
    ("{a} }", "a brace outside"),
    ("{a}{", "a brace outside"),
    ("{a}\t", "control characters"),
])
def test_claim_templates_that_are_not_refuse_to_parse(template: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        ClaimTemplate.parse(template)
