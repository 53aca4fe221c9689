"""Identity from claims: the only place claim names are read."""

from __future__ import annotations

import pytest

from gateway.identity import Identity


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
