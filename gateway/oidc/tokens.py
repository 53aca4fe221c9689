"""ID token validation per OpenID Connect Core 1.0 §3.1.3.7, with joserfc doing the JOSE work.

Signature and claims are checked in one call, `validate_id_token`, so no caller can get claims
that were only half checked. Pure: no I/O, time is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey
from joserfc.jwt import ClaimsOption, JWTClaimsRegistry

_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
_MAX_TOKEN_LENGTH = 16384
MAX_TOKEN_AGE = 600  # seconds; tokens are used at once (callback, back-channel POST)
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"


class TokenError(Exception):
    """An ID token failed a check; the message names the check (never the token)."""


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
        raise TokenError("token is too large")
    try:
        header = jws.extract_compact(token.encode()).protected
    except (JoseError, ValueError, UnicodeError) as exc:
        raise TokenError("token is not a compact JWS") from exc
    # joserfc only asks `"alg" in header`, which a JSON array or string also passes.
    if not isinstance(header, dict):
        raise TokenError("token header is not a JSON object")
    return header


def _verification_key(alg: str, keys: KeySet, expect: Expectations) -> KeySet | OctKey:
    # SECURITY: algorithm confusion. An HMAC token is verified only with the client secret
    # (Core §10.1), and an asymmetric one only with the IdP's non-symmetric keys.
    if alg in _HMAC_ALGS:
        return OctKey.import_key(expect.client_secret)
    public = [key for key in keys.keys if key.key_type != "oct"]
    return KeySet(public)


def _verified_claims(token: str, keys: KeySet, expect: Expectations) -> dict[str, object]:
    header = header_of(token)
    alg = header.get("alg")
    # Core §3.1.3.7 (7): alg must be one the IdP advertises; "none" never is (see provider).
    if not isinstance(alg, str) or alg not in expect.algorithms or alg == "none":
        raise TokenError(f"signing algorithm {alg!r} is not allowed")
    key = _verification_key(alg, keys, expect)
    try:
        decoded = jwt.decode(token, _kid_tolerant(key, header), algorithms=[alg])
    except JoseError as exc:
        raise TokenError(f"signature check failed ({exc.error})") from exc
    if not isinstance(decoded.claims, dict):
        raise TokenError("token payload is not a JSON object")
    return dict(decoded.claims)


def validate_id_token(token: str, keys: KeySet, expect: Expectations, *,
                      nonce: str | None) -> dict[str, object]:
    """Verified claims of an ID token, or TokenError naming the failed check."""
    claims = _verified_claims(token, keys, expect)
    _check_claims(claims, expect, nonce)
    return claims


def validate_logout_token(token: str, keys: KeySet, expect: Expectations) -> dict[str, object]:
    """Verified claims of a logout token (OIDC Back-Channel Logout 1.0 §2.6).

    The jti replay check needs the store, so the caller does it with the returned jti.
    """
    claims = _verified_claims(token, keys, expect)
    _check_common(claims, expect, sub_required=False)
    events = claims.get("events")
    # §2.4: events must hold the back-channel logout event, as a JSON object.
    if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
        raise TokenError("events claim lacks the back-channel logout event")
    if not isinstance(claims.get("sid"), str) and not isinstance(claims.get("sub"), str):
        raise TokenError("logout token names neither sid nor sub")
    if "nonce" in claims:  # §2.4: forbidden, so an ID token cannot pass as a logout token
        raise TokenError("logout token has a nonce")
    if not isinstance(claims.get("jti"), str):
        raise TokenError("logout token has no jti")
    return claims


def _kid_tolerant(key: KeySet | OctKey, header: Mapping[str, object]) -> KeySet | OctKey:
    """joserfc needs a kid to choose from a set; a kid-less token may use the IdP's only key."""
    if isinstance(key, KeySet) and "kid" not in header:
        if len(key.keys) != 1:
            raise TokenError("token has no kid and the JWKS has several keys")
        return key.keys[0]  # type: ignore[return-value]
    return key


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
        raise TokenError(f"claim check failed ({exc.error}: {exc.description})") from exc
    issued = claims["iat"]
    # A logout or ID token is for now: one issued long ago is a replay, whatever exp says.
    if isinstance(issued, int | float) and issued < expect.now() - MAX_TOKEN_AGE:
        raise TokenError("token was issued too long ago (iat)")


def _check_claims(claims: dict[str, object], expect: Expectations, nonce: str | None) -> None:
    _check_common(claims, expect, sub_required=True)
    # Core §2: sub is a string of at most 255 characters; it becomes a header value, so no
    # control characters either.
    sub = claims["sub"]
    if not isinstance(sub, str) or not 0 < len(sub) <= 255 or not sub.isprintable():
        raise TokenError("sub is not a string of 1 to 255 printable characters")
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    # Core §3.1.3.7 (4)-(5): with several audiences, azp must be present and be us.
    if len(audiences) > 1 and claims.get("azp") != expect.client_id:
        raise TokenError("several audiences but azp is not the client_id")
    if "azp" in claims and claims["azp"] != expect.client_id:
        raise TokenError("azp is not the client_id")
    # Core §3.1.3.7 (11): the nonce must be the one this login sent.
    if nonce is not None and claims.get("nonce") != nonce:
        raise TokenError("nonce does not match the login")
