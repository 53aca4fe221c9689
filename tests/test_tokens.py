"""ID token validation (OIDC Core §3.1.3.7): each check has a token that fails it."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import KeySet, OctKey, RSAKey

from gateway.oidc.tokens import (
    Expectations,
    TokenError,
    header_of,
    validate_id_token,
    validate_logout_token,
)

NOW = 1_800_000_000
ISSUER = "https://idp.example.com"
CLIENT_ID = "gateway"
SECRET = "client-secret-" + "x" * 40
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})
KEYS = KeySet([KEY])


def expect(**changes: Any) -> Expectations:
    values: dict[str, Any] = {"issuer": ISSUER, "client_id": CLIENT_ID, "client_secret": SECRET,
                              "algorithms": ("RS256",), "leeway": 60, "now": lambda: NOW}
    values.update(changes)
    return Expectations(**values)


def claims(**changes: Any) -> dict[str, Any]:
    values = {"iss": ISSUER, "sub": "alice", "aud": CLIENT_ID, "exp": NOW + 300, "iat": NOW,
              "nonce": "n-1"}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def sign(payload: dict[str, Any], key: Any = KEY, alg: str = "RS256",
         header: dict[str, Any] | None = None) -> str:
    base = {"alg": alg, "kid": "k1"} if alg.startswith("RS") else {"alg": alg}
    return jwt.encode({**base, **(header or {})}, payload, key, algorithms=[alg])


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_valid_id_token_returns_its_claims() -> None:
    result = validate_id_token(sign(claims()), KEYS, expect(), nonce="n-1")
    assert result["sub"] == "alice"


@pytest.mark.parametrize(("changes", "check"), [
    ({"iss": "https://evil.example.com"}, "iss"),
    ({"aud": "someone-else"}, "aud"),
    ({"aud": ["someone-else", "another"]}, "aud"),
    ({"exp": NOW - 61}, "exp"),
    ({"iat": NOW + 61}, "issued in the future"),
    ({"exp": None}, "exp"),
    ({"iat": None}, "iat"),
    ({"sub": None}, "sub"),
    ({"sub": 42}, "sub is not a string"),
    ({"sub": ""}, "sub"),
    ({"sub": "alice\r\nX-Forwarded-Groups: admins"}, "printable"),
    ({"sub": "a" * 256}, "255"),
])
def test_id_token_failing_a_claim_check_is_refused(changes: dict[str, Any], check: str) -> None:
    with pytest.raises(TokenError, match=check):
        validate_id_token(sign(claims(**changes)), KEYS, expect(), nonce="n-1")


def test_expiry_within_the_leeway_is_accepted() -> None:
    validate_id_token(sign(claims(exp=NOW - 30)), KEYS, expect(), nonce="n-1")


def test_wrong_nonce_is_refused() -> None:
    """Replay: an ID token minted for another login must not complete this one."""
    with pytest.raises(TokenError, match="nonce"):
        validate_id_token(sign(claims(nonce="other")), KEYS, expect(), nonce="n-1")
    with pytest.raises(TokenError, match="nonce"):
        validate_id_token(sign(claims(nonce=None)), KEYS, expect(), nonce="n-1")


def test_several_audiences_need_azp_equal_to_the_client() -> None:
    token = sign(claims(aud=[CLIENT_ID, "other"]))
    with pytest.raises(TokenError, match="azp"):
        validate_id_token(token, KEYS, expect(), nonce="n-1")
    good = sign(claims(aud=[CLIENT_ID, "other"], azp=CLIENT_ID))
    assert validate_id_token(good, KEYS, expect(), nonce="n-1")["azp"] == CLIENT_ID


def test_azp_naming_another_client_is_refused() -> None:
    with pytest.raises(TokenError, match="azp"):
        validate_id_token(sign(claims(azp="other")), KEYS, expect(), nonce="n-1")


def test_signature_by_another_key_with_the_same_kid_is_refused() -> None:
    """Forgery: a token signed by an attacker's key that claims the IdP's kid."""
    with pytest.raises(TokenError, match="signature"):
        validate_id_token(sign(claims(), key=OTHER_KEY), KEYS, expect(), nonce="n-1")


def test_unknown_kid_is_refused() -> None:
    token = sign(claims(), header={"kid": "unknown"})
    with pytest.raises(TokenError, match="signature"):
        validate_id_token(token, KEYS, expect(), nonce="n-1")


def test_unsigned_alg_none_token_is_refused() -> None:
    """alg=none: a token with no signature at all."""
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    with pytest.raises(TokenError, match="algorithm"):
        validate_id_token(token, KEYS, expect(algorithms=("RS256", "none")), nonce="n-1")


def test_algorithm_outside_the_allow_list_is_refused() -> None:
    token = sign(claims(), alg="RS384")
    with pytest.raises(TokenError, match="algorithm"):
        validate_id_token(token, KEYS, expect(), nonce="n-1")


def test_hmac_token_is_accepted_only_with_the_client_secret_and_when_allowed() -> None:
    token = sign(claims(), key=OctKey.import_key(SECRET), alg="HS256")
    with pytest.raises(TokenError, match="algorithm"):
        validate_id_token(token, KEYS, expect(), nonce="n-1")
    result = validate_id_token(token, KEYS, expect(algorithms=("RS256", "HS256")), nonce="n-1")
    assert result["sub"] == "alice"


def test_hmac_token_keyed_with_the_public_key_is_refused() -> None:
    """Algorithm confusion: HS256 'signed' with the IdP's public RSA key as the HMAC secret."""
    with pytest.warns(SecurityWarning):  # joserfc itself warns against such a key
        confused = OctKey.import_key(KEY.as_pem(private=False))
    token = sign(claims(), key=confused, alg="HS256")
    with pytest.raises(TokenError, match="signature"):
        validate_id_token(token, KEYS, expect(algorithms=("RS256", "HS256")), nonce="n-1")


def test_rsa_token_is_never_checked_against_symmetric_keys_in_the_jwks() -> None:
    mixed = KeySet([OctKey.import_key(SECRET, {"kid": "k1"})])
    token = sign(claims(), key=OctKey.import_key(SECRET), alg="HS256", header={"kid": "k1"})
    with pytest.raises(TokenError):
        validate_id_token(token, mixed, expect(client_secret="x" * 40,
                                               algorithms=("HS256",)), nonce="n-1")


def test_token_without_kid_uses_the_only_key_and_is_refused_with_several() -> None:
    token = jwt.encode({"alg": "RS256"}, claims(), KEY)
    assert validate_id_token(token, KEYS, expect(), nonce="n-1")["sub"] == "alice"
    two = KeySet([KEY, RSAKey.generate_key(2048, parameters={"kid": "k2"})])
    with pytest.raises(TokenError, match="no kid"):
        validate_id_token(token, two, expect(), nonce="n-1")


@pytest.mark.parametrize("garbage", ["", "a.b", "not-a-jwt", "a.b.c", "x" * 20000])
def test_garbage_and_oversized_tokens_are_refused(garbage: str) -> None:
    with pytest.raises(TokenError):
        validate_id_token(garbage, KEYS, expect(), nonce="n-1")


def test_header_of_reads_the_kid_without_verifying() -> None:
    assert header_of(sign(claims()))["kid"] == "k1"


EVENT = {"http://schemas.openid.net/event/backchannel-logout": {}}


def logout_claims(**changes: Any) -> dict[str, Any]:
    values = {"iss": ISSUER, "aud": CLIENT_ID, "iat": NOW, "exp": NOW + 120, "jti": "j-1",
              "sid": "sid-1", "sub": "alice", "events": EVENT}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def test_valid_logout_token_returns_its_claims() -> None:
    result = validate_logout_token(sign(logout_claims()), KEYS, expect())
    assert (result["sid"], result["sub"], result["jti"]) == ("sid-1", "alice", "j-1")
    only_sub = validate_logout_token(sign(logout_claims(sid=None)), KEYS, expect())
    assert only_sub["sub"] == "alice"


@pytest.mark.parametrize(("token", "check"), [
    (sign(logout_claims(), key=OTHER_KEY), "signature"),
    (sign(logout_claims(iss="https://evil.example.com")), "iss"),
    (sign(logout_claims(aud="other-client")), "aud"),
    (sign(logout_claims(events=None)), "events"),
    (sign(logout_claims(events={"urn:other": {}})), "events"),
    (sign(logout_claims(events=["http://schemas.openid.net/event/backchannel-logout"])), "events"),
    (sign(logout_claims(nonce="n")), "nonce"),
    (sign(logout_claims(sid=None, sub=None)), "neither sid nor sub"),
    (sign(logout_claims(jti=None)), "jti"),
    (sign(logout_claims(exp=NOW - 120)), "exp"),
    (sign(logout_claims(iat=NOW - 3600, exp=NOW + 3600)), "too long ago"),
    (sign(logout_claims(iat=None)), "iat"),
], ids=["bad-signature", "wrong-iss", "wrong-aud", "no-events", "other-event", "events-list",
        "nonce", "no-sid-or-sub", "no-jti", "expired", "old-iat", "no-iat"])
def test_logout_token_failing_a_check_is_refused(token: str, check: str) -> None:
    with pytest.raises(TokenError, match=check):
        validate_logout_token(token, KEYS, expect())


def test_an_id_token_is_not_a_logout_token() -> None:
    """Token confusion: a stolen ID token (it carries a nonce, no events) cannot log anyone out."""
    with pytest.raises(TokenError):
        validate_logout_token(sign(claims()), KEYS, expect())


@pytest.mark.parametrize("header", ['["alg","RS256"]', '"alg"'], ids=["array", "string"])
def test_token_whose_header_is_not_a_json_object_is_refused(header: str) -> None:
    """A garbage logout_token must be a 400, not a 500 with a traceback."""
    encoded = base64.urlsafe_b64encode(header.encode()).rstrip(b"=").decode()
    token = f"{encoded}.{b64({'sub': 'x'})}.c2ln"
    with pytest.raises(TokenError, match="header"):
        header_of(token)
    with pytest.raises(TokenError):
        validate_logout_token(token, KEYS, expect())


@pytest.mark.parametrize("payload", [b"[1, 2]", b"42", b'"alice"', b"null"])
def test_signed_token_whose_payload_is_not_an_object_is_refused(payload: bytes) -> None:
    from joserfc import jws

    token = jws.serialize_compact({"alg": "RS256", "kid": "k1"}, payload, KEY)
    with pytest.raises(TokenError, match="payload"):
        validate_id_token(token, KEYS, expect(), nonce="n-1")
