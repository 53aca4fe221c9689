"""ID, logout and access token validation per OpenID Connect Core 1.0 §3.1.3.7, Back-Channel
Logout 1.0 §2.6 and RFC 9068 (JWT access tokens), with joserfc doing the JOSE work.

Signature and claims are checked in one call, so no caller can get claims that were only half
checked. Every refusal is a TokenError whose `code` names the failed check (`bad_signature`,
`claim_aud`, `at_hash_mismatch`, ...): callers and tests rely on the code, never on a library's
message wording. Pure: no I/O, time is passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from joserfc import jws, jwt
from joserfc.errors import ClaimError, ExpiredTokenError, InvalidPayloadError, JoseError
from joserfc.jwk import KeySet, OctKey
from joserfc.jwt import ClaimsOption, JWTClaimsRegistry

_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
_MAX_TOKEN_LENGTH = 16384
MAX_TOKEN_AGE = 600  # seconds; tokens are used at once (callback, back-channel POST)
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
_CHECKED_CLAIMS = frozenset({"iss", "aud", "exp", "iat", "nbf", "sub", "jti"})
# RFC 9068 §4 / RFC 8725 §3.1: access tokens are verified with the IdP's public keys only, so
# only asymmetric algs are listed; an HMAC token ("signed" with the public key as the secret,
# the classic confusion) or an unsigned one is refused before any key is looked at.
ACCESS_TOKEN_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                     "ES512", "EdDSA", "Ed25519")
# Claims only an ID token carries: with `token_typ: any`, a token holding one is an ID token
# replayed as an access token (both are JWTs from the same keys, often with the same aud).
_ID_TOKEN_ONLY = ("nonce", "at_hash", "c_hash", "s_hash", "events")


class TokenError(Exception):
    """A token failed a check. `code` names the check; the message adds what was seen (never
    the token itself)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


@dataclass(frozen=True, slots=True)
class Expectations:
    issuer: str
    client_id: str
    client_secret: str
    algorithms: tuple[str, ...]
    leeway: int
    now: Callable[[], float]


def header_of(token: str) -> Mapping[str, object]:
    """The unverified JOSE header, to pick a key by kid before verification."""
    if len(token) > _MAX_TOKEN_LENGTH:
        raise TokenError("malformed", "token is too large")
    try:
        header = jws.extract_compact(token.encode()).protected
    except (JoseError, ValueError, UnicodeError) as exc:
        raise TokenError("malformed", "token is not a compact JWS") from exc
    # joserfc only asks `"alg" in header`, which a JSON array or string also passes.
    if not isinstance(header, dict):
        raise TokenError("malformed", "token header is not a JSON object")
    return header


def kid_of(token: str) -> str | None:
    kid = header_of(token).get("kid")
    return kid if isinstance(kid, str) else None


def _verification_key(alg: str, keys: KeySet, client_secret: str | None) -> KeySet | OctKey:
    # SECURITY: algorithm confusion. An HMAC token is verified only with the client secret
    # (Core §10.1), and an asymmetric one only with the IdP's non-symmetric keys.
    if alg in _HMAC_ALGS:
        if client_secret is None:
            raise TokenError("alg_not_allowed", f"signing algorithm {alg!r} is not allowed")
        try:
            return OctKey.import_key(client_secret)
        except (JoseError, ValueError) as exc:  # joserfc >= 1.8 refuses PEM-like secrets
            raise TokenError("key_unusable", "the client secret is not usable as an HMAC "
                                             "key") from exc
    public = [key for key in keys.keys if key.key_type != "oct"]
    return KeySet(public)


@dataclass(frozen=True, slots=True)
class _Verified:
    alg: str
    curve: str | None  # the verifying key's crv (OKP and EC keys), for at_hash with EdDSA
    claims: dict[str, object]


def _verified(token: str, keys: KeySet, *, algorithms: tuple[str, ...],
              client_secret: str | None) -> _Verified:
    """The signing alg, key curve and claims of a token whose signature checked out; HMAC
    tokens only with a client secret."""
    header = header_of(token)
    alg = header.get("alg")
    # Core §3.1.3.7 (7): alg must be one the IdP advertises; "none" never is (see provider).
    if not isinstance(alg, str) or alg not in algorithms or alg == "none":
        raise TokenError("alg_not_allowed", f"signing algorithm {alg!r} is not allowed")
    key = _kid_tolerant(_verification_key(alg, keys, client_secret), header)
    try:
        decoded = jwt.decode(token, key, algorithms=[alg])
    except InvalidPayloadError as exc:
        raise TokenError("malformed", "token payload is not a JSON object") from exc
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        # TypeError/KeyError: joserfc trips over some malformed headers ("crit": null).
        error = exc.error if isinstance(exc, JoseError) else type(exc).__name__
        raise TokenError("bad_signature", f"signature check failed ({error})") from exc
    if not isinstance(decoded.claims, dict):
        raise TokenError("malformed", "token payload is not a JSON object")
    return _Verified(alg, _curve_of(key, header.get("kid")), dict(decoded.claims))


def _curve_of(key: KeySet | OctKey, kid: object) -> str | None:
    """The crv of the key that verified the token (kid-less tokens got a single key)."""
    if not isinstance(key, KeySet):
        crv = key.as_dict(private=False).get("crv")
    elif isinstance(kid, str):
        try:
            crv = key.get_by_kid(kid).as_dict(private=False).get("crv")
        except (JoseError, ValueError, KeyError):
            return None
    else:
        return None
    return crv if isinstance(crv, str) else None


def validate_id_token(token: str, keys: KeySet, expect: Expectations, *,
                      nonce: str | None, access_token: str | None = None,
                      max_age: int | None = None,
                      acr_values: Collection[str] = ()) -> dict[str, object]:
    """Verified claims of an ID token, or TokenError naming the failed check.

    `access_token` is the one issued with it: when the ID token has at_hash, it must match.
    `max_age` and `acr_values` are what the authorization request asked for (a step-up).
    """
    verified = _verified(token, keys, algorithms=expect.algorithms,
                         client_secret=expect.client_secret)
    claims = verified.claims
    _check_claims(claims, expect, nonce)
    if "at_hash" in claims and access_token is not None:
        _check_at_hash(claims["at_hash"], verified, access_token)
    if max_age is not None:
        _check_auth_time(claims, expect, max_age)
    acr = claims.get("acr")
    if acr_values and (not isinstance(acr, str) or acr not in acr_values):
        raise TokenError("claim_acr", f"acr {claims.get('acr')!r} is none of the requested "
                                      f"{sorted(acr_values)}")
    return claims


def _check_auth_time(claims: Mapping[str, object], expect: Expectations, max_age: int) -> None:
    """Core §3.1.2.1 and §3.1.3.7 (13): with max_age requested, auth_time is required, and
    the user must have authenticated within it; an IdP that ignores max_age must not pass
    an old sign-in off as a fresh one."""
    auth_time = claims.get("auth_time")
    if isinstance(auth_time, bool) or not isinstance(auth_time, int | float):
        raise TokenError("claim_auth_time", "no auth_time, though max_age was requested")
    age = expect.now() - auth_time
    if age > max_age + expect.leeway:
        raise TokenError("claim_auth_time", f"the user authenticated {age:.0f}s ago, over the "
                                            f"requested max_age of {max_age}s")


def validate_logout_token(token: str, keys: KeySet, expect: Expectations) -> dict[str, object]:
    """Verified claims of a logout token (OIDC Back-Channel Logout 1.0 §2.6).

    The jti replay check needs the store, so the caller does it with the returned jti.
    """
    claims = _verified(token, keys, algorithms=expect.algorithms,
                       client_secret=expect.client_secret).claims
    _check_common(claims, expect, sub_required=False)
    events = claims.get("events")
    # §2.4: events must hold the back-channel logout event, as a JSON object.
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
        raise TokenError("claim_events", "events claim lacks the back-channel logout event")
    if not isinstance(claims.get("sid"), str) and not isinstance(claims.get("sub"), str):
        raise TokenError("claim_sid", "logout token names neither sid nor sub")
    if "nonce" in claims:  # §2.4: forbidden, so an ID token cannot pass as a logout token
        raise TokenError("claim_nonce", "logout token has a nonce")
    if not isinstance(claims.get("jti"), str):
        raise TokenError("claim_jti", "logout token has no jti")
    return claims


def validate_access_token(token: str, keys: KeySet, *, issuer: str,
                          audiences: tuple[str, ...], any_typ: bool, leeway: int,
                          now: Callable[[], float]) -> dict[str, object]:
    """Verified claims of a JWT access token sent by an API client (RFC 9068 §4), or
    TokenError naming the failed check.

    typ must be at+jwt (§2.1), unless `any_typ` (IdPs that type their access tokens JWT or
    not at all: then ID-token-only claims refuse it); the signature must verify with one of
    the IdP's public keys; iss must be the issuer; aud must hold one of `audiences`; exp is
    required; nbf, when present, must have passed; sub names who is calling."""
    typ = header_of(token).get("typ")
    kind = typ.lower().removeprefix("application/") if isinstance(typ, str) else None
    if kind != "at+jwt" and not (any_typ and kind in (None, "jwt")):
        raise TokenError("typ", f"typ {typ!r} is not an access token type accepted here")
    claims = _verified(token, keys, algorithms=ACCESS_TOKEN_ALGS, client_secret=None).claims
    options: dict[str, ClaimsOption] = {
        "iss": {"essential": True, "value": issuer},
        "aud": {"essential": True, "values": list(audiences)},
        "exp": {"essential": True},
        "sub": {"essential": True},
    }
    registry = JWTClaimsRegistry(now=lambda: int(now()), leeway=leeway, **options)
    try:
        registry.validate(claims)
    except JoseError as exc:
        raise TokenError(_claim_code(exc), f"claim check failed ({exc.error})") from exc
    check_subject(claims)
    if kind != "at+jwt" and any(name in claims for name in _ID_TOKEN_ONLY):
        raise TokenError("typ", "the token carries ID token claims")
    return claims


def check_subject(claims: Mapping[str, object]) -> None:
    """Core §2: sub is a string of at most 255 characters; it becomes a header value, so no
    control characters either."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= 255 or not sub.isprintable():
        raise TokenError("claim_sub", "sub is not a string of 1 to 255 printable characters")


def _kid_tolerant(key: KeySet | OctKey, header: Mapping[str, object]) -> KeySet | OctKey:
    """joserfc needs a kid to choose from a set; a kid-less token may use the IdP's only key."""
    if isinstance(key, KeySet) and "kid" not in header:
        if len(key.keys) != 1:
            raise TokenError("no_key", "token has no kid and the JWKS has several keys")
        return key.keys[0]  # type: ignore[return-value]
    return key


def _claim_code(exc: JoseError) -> str:
    if isinstance(exc, ExpiredTokenError):
        return "claim_exp"
    claim = exc.claim if isinstance(exc, ClaimError) else ""
    return f"claim_{claim}" if claim in _CHECKED_CLAIMS else "claim_invalid"


def _check_common(claims: dict[str, object], expect: Expectations, *,
                  sub_required: bool) -> None:
    options: dict[str, ClaimsOption] = {
        "iss": {"essential": True, "value": expect.issuer},  # Core §3.1.3.7 (2)
        "aud": {"essential": True, "value": expect.client_id},  # (3): aud contains client_id
        "iat": {"essential": True},  # (10)
    }
    if sub_required:
        options["sub"] = {"essential": True}
        options["exp"] = {"essential": True}  # (9); logout tokens may omit exp
    registry = JWTClaimsRegistry(now=lambda: int(expect.now()), leeway=expect.leeway, **options)
    try:
        registry.validate(claims)
    except JoseError as exc:
        raise TokenError(_claim_code(exc), f"claim check failed ({exc.error})") from exc
    issued = claims["iat"]
    # A logout or ID token is for now: one issued long ago is a replay, whatever exp says.
    if isinstance(issued, int | float) and issued < expect.now() - MAX_TOKEN_AGE:
        raise TokenError("claim_iat", "token was issued too long ago")


def _check_claims(claims: dict[str, object], expect: Expectations, nonce: str | None) -> None:
    _check_common(claims, expect, sub_required=True)
    check_subject(claims)
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    # Core §3.1.3.7 (4)-(5): with several audiences, azp must be present and be us.
    if len(audiences) > 1 and claims.get("azp") != expect.client_id:
        raise TokenError("claim_azp", "several audiences but azp is not the client_id")
    if "azp" in claims and claims["azp"] != expect.client_id:
        raise TokenError("claim_azp", "azp is not the client_id")
    # Core §3.1.3.7 (11): the nonce must be the one this login sent.
    if nonce is not None and claims.get("nonce") != nonce:
        raise TokenError("claim_nonce", "nonce does not match the login")


# The hash of each JWS alg (RFC 7518, RFC 8037, RFC 8812, RFC 9864) that at_hash uses: the
# left half of it. EdDSA names no hash: Ed25519 keys mean SHA-512, Ed448 keys SHAKE256 with a
# 114-byte output (OpenID Connect errata), so the verifying key's curve decides.
_SHA256 = frozenset({"HS256", "RS256", "ES256", "PS256", "ES256K"})
_SHA384 = frozenset({"HS384", "RS384", "ES384", "PS384"})
_SHA512 = frozenset({"HS512", "RS512", "ES512", "PS512", "Ed25519"})


def _at_hash_digest(verified: _Verified, data: bytes) -> bytes | None:
    alg = verified.alg
    if alg in _SHA256:
        return hashlib.sha256(data).digest()
    if alg in _SHA384:
        return hashlib.sha384(data).digest()
    if alg in _SHA512 or (alg == "EdDSA" and verified.curve == "Ed25519"):
        return hashlib.sha512(data).digest()
    if alg == "Ed448" or (alg == "EdDSA" and verified.curve == "Ed448"):
        return hashlib.shake_256(data).digest(114)
    return None


def _check_at_hash(at_hash: object, verified: _Verified, access_token: str) -> None:
    """Core §3.1.3.8 / §3.2.2.9: at_hash is the base64url left half of the hash of the access
    token, with the hash of the ID token's alg. A mismatch means the access token was swapped
    (token substitution), so the login ends before the token is used anywhere."""
    digest = _at_hash_digest(verified, access_token.encode("utf-8"))
    if digest is None:
        raise TokenError("at_hash_mismatch", f"at_hash cannot be checked for alg {verified.alg}")
    expected = base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=")
    # Compared as bytes: a non-ASCII str would make compare_digest raise.
    if not isinstance(at_hash, str) or not hmac.compare_digest(at_hash.encode("utf-8"), expected):
        raise TokenError("at_hash_mismatch", "at_hash does not match the access token")
