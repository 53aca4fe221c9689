"""ID and logout token validation (OIDC Core §3.1.3.7, Back-Channel Logout §2.6): each check has
a token that fails it, asserted on our own error code, never on a library's message wording."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, KeySet, OctKey, OKPKey, RSAKey

from gateway.oidc.tokens import (
    Expectations,
    TokenError,
    header_of,
    validate_access_token,
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


def b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def refused(code: str, check: Callable[[], object]) -> None:
    with pytest.raises(TokenError) as caught:
        check()
    assert caught.value.code == code, caught.value


def test_valid_id_token_returns_its_claims() -> None:
    result = validate_id_token(sign(claims()), KEYS, expect(), nonce="n-1")
    assert result["sub"] == "alice"


@pytest.mark.parametrize(("changes", "code"), [
    ({"iss": "https://evil.example.com"}, "claim_iss"),
    ({"aud": "someone-else"}, "claim_aud"),
    ({"aud": ["someone-else", "another"]}, "claim_aud"),
    ({"exp": NOW - 61}, "claim_exp"),
    ({"iat": NOW + 61}, "claim_iat"),  # issued in the future
    ({"exp": None}, "claim_exp"),
    ({"iat": None}, "claim_iat"),
    ({"iat": NOW - 3600}, "claim_iat"),  # issued too long ago
    ({"sub": None}, "claim_sub"),
    ({"sub": 42}, "claim_sub"),
    ({"sub": ""}, "claim_sub"),
    ({"sub": "alice\r\nX-Forwarded-Groups: admins"}, "claim_sub"),
    ({"sub": "a" * 256}, "claim_sub"),
])
def test_id_token_failing_a_claim_check_is_refused(changes: dict[str, Any], code: str) -> None:
    token = sign(claims(**changes))
    refused(code, lambda: validate_id_token(token, KEYS, expect(), nonce="n-1"))


def test_expiry_within_the_leeway_is_accepted() -> None:
    validate_id_token(sign(claims(exp=NOW - 30)), KEYS, expect(), nonce="n-1")


@pytest.mark.parametrize(("auth_time", "ok"), [
    (NOW - 300, True), (NOW - 360, True),  # within max_age plus the leeway
    (NOW - 361, False), (None, False), (True, False), ("1800000000", False)])
def test_a_step_up_login_needs_a_fresh_auth_time(auth_time: Any, ok: bool) -> None:
    """Core §3.1.3.7 (13): an IdP that ignored max_age must not pass an old sign-in off as
    the fresh one the route asked for."""
    token = sign(claims(auth_time=auth_time))
    check = lambda: validate_id_token(token, KEYS, expect(), nonce="n-1", max_age=300)  # noqa: E731
    if ok:
        check()
    else:
        refused("claim_auth_time", check)


@pytest.mark.parametrize(("acr", "ok"), [
    ("urn:mfa", True), ("urn:hw", True), ("urn:pwd", False), (None, False), (["urn:mfa"], False)])
def test_a_step_up_login_needs_a_requested_acr(acr: Any, ok: bool) -> None:
    token = sign(claims(acr=acr))
    check = lambda: validate_id_token(token, KEYS, expect(), nonce="n-1",  # noqa: E731
                                      acr_values=("urn:mfa", "urn:hw"))
    if ok:
        check()
    else:
        refused("claim_acr", check)


def test_wrong_nonce_is_refused() -> None:
    """Replay: an ID token minted for another login must not complete this one."""
    for token in (sign(claims(nonce="other")), sign(claims(nonce=None))):
        refused("claim_nonce", lambda t=token: validate_id_token(t, KEYS, expect(), nonce="n-1"))


def test_several_audiences_need_azp_equal_to_the_client() -> None:
    token = sign(claims(aud=[CLIENT_ID, "other"]))
    refused("claim_azp", lambda: validate_id_token(token, KEYS, expect(), nonce="n-1"))
    good = sign(claims(aud=[CLIENT_ID, "other"], azp=CLIENT_ID))
    assert validate_id_token(good, KEYS, expect(), nonce="n-1")["azp"] == CLIENT_ID


def test_azp_naming_another_client_is_refused() -> None:
    token = sign(claims(azp="other"))
    refused("claim_azp", lambda: validate_id_token(token, KEYS, expect(), nonce="n-1"))


def test_signature_by_another_key_with_the_same_kid_is_refused() -> None:
    """Forgery: a token signed by an attacker's key that claims the IdP's kid."""
    token = sign(claims(), key=OTHER_KEY)
    refused("bad_signature", lambda: validate_id_token(token, KEYS, expect(), nonce="n-1"))


def test_unknown_kid_is_refused() -> None:
    token = sign(claims(), header={"kid": "unknown"})
    refused("bad_signature", lambda: validate_id_token(token, KEYS, expect(), nonce="n-1"))


def test_unsigned_alg_none_token_is_refused() -> None:
    """alg=none: a token with no signature at all."""
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims())}."
    refused("alg_not_allowed", lambda: validate_id_token(
        token, KEYS, expect(algorithms=("RS256", "none")), nonce="n-1"))


def test_algorithm_outside_the_allow_list_is_refused() -> None:
    token = sign(claims(), alg="RS384")
    refused("alg_not_allowed", lambda: validate_id_token(token, KEYS, expect(), nonce="n-1"))


def test_hmac_token_is_accepted_only_with_the_client_secret_and_when_allowed() -> None:
    token = sign(claims(), key=OctKey.import_key(SECRET), alg="HS256")
    refused("alg_not_allowed", lambda: validate_id_token(token, KEYS, expect(), nonce="n-1"))
    result = validate_id_token(token, KEYS, expect(algorithms=("RS256", "HS256")), nonce="n-1")
    assert result["sub"] == "alice"


def hs256(payload: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand, as an attacker would: joserfc >= 1.8 refuses to build one
    keyed with a public key, which is exactly the key the attack uses."""
    signing_input = f"{b64({'alg': 'HS256', 'kid': 'k1'})}.{b64(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def test_hmac_token_keyed_with_the_public_key_is_refused() -> None:
    """Algorithm confusion: HS256 'signed' with the IdP's public RSA key as the HMAC secret."""
    token = hs256(claims(), KEY.as_pem(private=False))
    refused("bad_signature", lambda: validate_id_token(
        token, KEYS, expect(algorithms=("RS256", "HS256")), nonce="n-1"))


def test_hmac_token_with_a_client_secret_joserfc_refuses_as_a_key_is_a_clean_refusal() -> None:
    """joserfc >= 1.8 raises ValueError for a PEM-like HMAC key: a refusal, never a 500."""
    pem = KEY.as_pem(private=False).decode()
    token = hs256(claims(), pem.encode())
    with warnings.catch_warnings():  # older joserfc warns instead of refusing
        warnings.simplefilter("ignore", SecurityWarning)
        with pytest.raises(TokenError) as caught:
            validate_id_token(token, KEYS, expect(client_secret=pem, algorithms=("HS256",)),
                              nonce="n-1")
    assert caught.value.code in ("key_unusable", "bad_signature")


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
    refused("no_key", lambda: validate_id_token(token, two, expect(), nonce="n-1"))


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


@pytest.mark.parametrize(("token", "code"), [
    (sign(logout_claims(), key=OTHER_KEY), "bad_signature"),
    (sign(logout_claims(iss="https://evil.example.com")), "claim_iss"),
    (sign(logout_claims(aud="other-client")), "claim_aud"),
    (sign(logout_claims(events=None)), "claim_events"),
    (sign(logout_claims(events={"urn:other": {}})), "claim_events"),
    (sign(logout_claims(events=["http://schemas.openid.net/event/backchannel-logout"])),
     "claim_events"),
    (sign(logout_claims(nonce="n")), "claim_nonce"),
    (sign(logout_claims(sid=None, sub=None)), "claim_sid"),
    (sign(logout_claims(jti=None)), "claim_jti"),
    (sign(logout_claims(exp=NOW - 120)), "claim_exp"),
    (sign(logout_claims(iat=NOW - 3600, exp=NOW + 3600)), "claim_iat"),
    (sign(logout_claims(iat=None)), "claim_iat"),
], ids=["bad-signature", "wrong-iss", "wrong-aud", "no-events", "other-event", "events-list",
        "nonce", "no-sid-or-sub", "no-jti", "expired", "old-iat", "no-iat"])
def test_logout_token_failing_a_check_is_refused(token: str, code: str) -> None:
    refused(code, lambda: validate_logout_token(token, KEYS, expect()))


def test_an_id_token_is_not_a_logout_token() -> None:
    """Token confusion: a stolen ID token (it carries a nonce, no events) cannot log anyone out."""
    with pytest.raises(TokenError):
        validate_logout_token(sign(claims()), KEYS, expect())


@pytest.mark.parametrize("header", ['["alg","RS256"]', '"alg"'], ids=["array", "string"])
def test_token_whose_header_is_not_a_json_object_is_refused(header: str) -> None:
    """A garbage logout_token must be a 400, not a 500 with a traceback."""
    encoded = base64.urlsafe_b64encode(header.encode()).rstrip(b"=").decode()
    token = f"{encoded}.{b64({'sub': 'x'})}.c2ln"
    refused("malformed", lambda: header_of(token))
    with pytest.raises(TokenError):
        validate_logout_token(token, KEYS, expect())


@pytest.mark.parametrize("payload", [b"[1, 2]", b"42", b'"alice"', b"null"])
def test_signed_token_whose_payload_is_not_an_object_is_refused(payload: bytes) -> None:
    from joserfc import jws

    token = jws.serialize_compact({"alg": "RS256", "kid": "k1"}, payload, KEY)
    refused("malformed", lambda: validate_id_token(token, KEYS, expect(), nonce="n-1"))


def at_hash(access_token: str, function: Callable[[bytes], Any] = hashlib.sha256) -> str:
    digest = function(access_token.encode()).digest()
    return b64(digest[: len(digest) // 2])


def test_at_hash_matching_the_access_token_is_accepted() -> None:
    token = sign(claims(at_hash=at_hash("the-access-token")))
    result = validate_id_token(token, KEYS, expect(), nonce="n-1", access_token="the-access-token")
    assert result["sub"] == "alice"


def shake114(data: bytes) -> Any:
    class Digest:
        def digest(self) -> bytes:
            return hashlib.shake_256(data).digest(114)

    return Digest()


@pytest.mark.parametrize(("alg", "key", "function"), [
    ("RS512", lambda: RSAKey.generate_key(2048), hashlib.sha512),
    ("PS384", lambda: RSAKey.generate_key(2048), hashlib.sha384),
    ("ES256", lambda: ECKey.generate_key("P-256"), hashlib.sha256),
    ("ES512", lambda: ECKey.generate_key("P-521"), hashlib.sha512),
    ("ES256K", lambda: ECKey.generate_key("secp256k1"), hashlib.sha256),
    ("EdDSA", lambda: OKPKey.generate_key("Ed25519"), hashlib.sha512),
    ("EdDSA", lambda: OKPKey.generate_key("Ed448"), shake114),  # the curve decides
    ("Ed25519", lambda: OKPKey.generate_key("Ed25519"), hashlib.sha512),
    ("Ed448", lambda: OKPKey.generate_key("Ed448"), shake114),
], ids=["RS512", "PS384", "ES256", "ES512", "ES256K", "EdDSA-Ed25519", "EdDSA-Ed448",
        "Ed25519", "Ed448"])
def test_at_hash_uses_the_hash_of_the_signing_algorithm(
        alg: str, key: Callable[[], Any], function: Callable[[bytes], Any]) -> None:
    signing_key = key()
    keys = KeySet([signing_key])
    other_hash = hashlib.sha256 if function is not hashlib.sha256 else hashlib.sha384
    with warnings.catch_warnings():  # joserfc: "EdDSA is deprecated via RFC 9864"
        warnings.simplefilter("ignore", SecurityWarning)
        token = jwt.encode({"alg": alg}, claims(at_hash=at_hash("tok", function)), signing_key,
                           algorithms=[alg])
        validate_id_token(token, keys, expect(algorithms=(alg,)), nonce="n-1",
                          access_token="tok")
        wrong = jwt.encode({"alg": alg}, claims(at_hash=at_hash("tok", other_hash)),
                           signing_key, algorithms=[alg])
        refused("at_hash_mismatch", lambda: validate_id_token(
            wrong, keys, expect(algorithms=(alg,)), nonce="n-1", access_token="tok"))


@pytest.mark.parametrize("value", [at_hash("another-token"), "", 42, at_hash("the-access-token")
                                   + "A", "caf\u00e9"])
def test_at_hash_not_matching_the_access_token_is_refused(value: object) -> None:
    """Token substitution (Core §3.1.3.8): an access token that is not the one the ID token
    was issued with."""
    token = sign(claims(at_hash=value))
    refused("at_hash_mismatch", lambda: validate_id_token(
        token, KEYS, expect(), nonce="n-1", access_token="the-access-token"))


@pytest.mark.parametrize("crit", [None, [1], [[]], "x"])
def test_a_malformed_crit_header_is_a_refusal_not_a_crash(crit: object) -> None:
    """Anyone can POST a logout token: joserfc raised TypeError on these (a 500)."""
    token = f"{b64({'alg': 'RS256', 'kid': 'k1', 'crit': crit})}.{b64(logout_claims())}.c2ln"
    with pytest.raises(TokenError):
        validate_logout_token(token, KEYS, expect())


# --- JWT access tokens from API clients (RFC 9068 §4) ---

API = "https://api.example.com"


def access_claims(**changes: Any) -> dict[str, Any]:
    values = {"iss": ISSUER, "sub": "robot", "aud": API, "exp": NOW + 300, "iat": NOW,
              "client_id": "robot", "scope": "read"}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def access(token: str, *, any_typ: bool = False, audiences: tuple[str, ...] = (API,),
           keys: KeySet = KEYS) -> dict[str, object]:
    return validate_access_token(token, keys, issuer=ISSUER, audiences=audiences,
                                 any_typ=any_typ, leeway=60, now=lambda: NOW)


AT_JWT = {"typ": "at+jwt"}


def test_valid_access_token_returns_its_claims() -> None:
    assert access(sign(access_claims(), header=AT_JWT))["sub"] == "robot"
    assert access(sign(access_claims(), header={"typ": "application/AT+JWT"}))["sub"] == "robot"


def test_access_token_audience_is_any_of_the_configured() -> None:
    token = sign(access_claims(aud=["https://other.example.com", API]), header=AT_JWT)
    assert access(token, audiences=("https://third.example.com", API))["sub"] == "robot"


@pytest.mark.parametrize(("changes", "code"), [
    ({"iss": "https://evil.example.com"}, "claim_iss"),
    ({"aud": "https://other.example.com"}, "claim_aud"),
    ({"aud": CLIENT_ID}, "claim_aud"),  # an ID token's audience is not the API
    ({"aud": None}, "claim_aud"),
    ({"exp": NOW - 61}, "claim_exp"),
    ({"exp": None}, "claim_exp"),
    ({"nbf": NOW + 61}, "claim_nbf"),
    ({"sub": None}, "claim_sub"),
    ({"sub": "a\nb"}, "claim_sub"),
])
def test_access_token_claim_checks(changes: dict[str, Any], code: str) -> None:
    refused(code, lambda: access(sign(access_claims(**changes), header=AT_JWT)))


def test_missing_essential_claims_are_refused() -> None:
    with pytest.raises(TokenError):
        access(sign(access_claims(exp=None, sub=None), header=AT_JWT))


@pytest.mark.parametrize("typ", [None, "JWT", "logout+jwt", "id_token+jwt", "dpop+jwt"])
def test_access_token_must_be_typed_at_jwt(typ: str | None) -> None:
    header = {"typ": typ} if typ else {}
    refused("typ", lambda: access(sign(access_claims(), header=header)))


@pytest.mark.parametrize("typ", [None, "JWT"])
def test_any_typ_accepts_plain_jwts(typ: str | None) -> None:
    header = {"typ": typ} if typ else {}
    assert access(sign(access_claims(), header=header), any_typ=True)["sub"] == "robot"


@pytest.mark.parametrize("claim", ["nonce", "at_hash", "c_hash", "events"])
def test_any_typ_still_refuses_id_and_logout_tokens(claim: str) -> None:
    token = sign(access_claims(**{claim: "x"}), header={"typ": "JWT"})
    refused("typ", lambda: access(token, any_typ=True))
    refused("typ", lambda: access(sign(access_claims(), header={"typ": "logout+jwt"}),
                                  any_typ=True))


def test_access_token_signed_by_another_key_is_refused() -> None:
    refused("bad_signature", lambda: access(sign(access_claims(), OTHER_KEY, header=AT_JWT)))


def test_unsigned_access_token_is_refused() -> None:
    token = f"{b64({'alg': 'none', 'typ': 'at+jwt'})}.{b64(access_claims())}."
    refused("alg_not_allowed", lambda: access(token))


def test_hmac_access_token_is_refused_whatever_the_secret() -> None:
    """HMAC confusion: the IdP's public key (which anyone can fetch) as the HMAC secret."""
    pem = KEY.as_pem(private=False)
    header = b64({"alg": "HS256", "typ": "at+jwt", "kid": "k1"})
    body = b64(access_claims())
    mac = hmac.new(pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    refused("alg_not_allowed", lambda: access(f"{header}.{body}.{b64(mac)}"))
    refused("alg_not_allowed", lambda: access(sign(access_claims(), OctKey.import_key(SECRET),
                                                   "HS256", header=AT_JWT)))
