"""Principals from bearer tokens (RFC 6750) on routes with `bearer: true`: API clients.

A request there with `Authorization: Bearer <token>` is judged by the token alone (a session
cookie beside it is ignored, and a bad token is a 401 even with one). A JWT is verified here,
against the IdP's keys (oidc/verifier.py, RFC 9068); an opaque token is introspected at the
IdP (RFC 7662) when `api.introspection` is on. Either way the token must name this API
among its audiences (`api.audiences`, or the route's `audiences`), and the same policy and
identity headers apply as for a browser session. No session is created.

Refusals follow RFC 6750 §3.1: a malformed Authorization is 400 invalid_request; a token that
fails any check is 401 invalid_token, saying which check in words (never the token); an IdP
or store that cannot be reached is a 503, never a pass.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from aiohttp import web

from gateway.errors import BearerRequestError, InvalidTokenError
from gateway.identity import Identity
from gateway.oidc.tokens import TokenError
from gateway.routing import Route
from gateway.runtime import Runtime, Snapshot

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_TOKEN_LENGTH = 16384

# What a client is told about a refused token: which check, in words, per TokenError code.
_DESCRIPTIONS = {
    "malformed": "the token is malformed",
    "typ": "the token is not an access token (typ)",
    "alg_not_allowed": "the token's signing algorithm is not accepted",
    "bad_signature": "the token's signature does not verify",
    "no_key": "the token is signed with a key the issuer does not publish",
    "claim_exp": "the token has expired",
    "claim_nbf": "the token is not valid yet",
    "claim_iss": "the token is from another issuer",
    "claim_aud": "the token is not meant for this API (aud)",
    "claim_sub": "the token names no usable subject",
    "inactive": "the token is not active",
    "token_type": "the token is not an access token",
    "not_introspected": "the token is not a JWT, and opaque tokens are not accepted here",
}


def token_of(request: web.BaseRequest) -> str | None:
    """The bearer token the request carries; None when it carries none (or another scheme,
    such as Basic, which the route then treats as no credential)."""
    values = request.headers.getall("Authorization", ())
    if not values:
        return None
    if len(values) > 1:
        raise BearerRequestError("more than one Authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip(" ")
    if len(token) > MAX_TOKEN_LENGTH or not _B64TOKEN.fullmatch(token):
        raise InvalidTokenError("the bearer token is not an RFC 6750 b64token",
                                description=_DESCRIPTIONS["malformed"])
    return token


class Checked(NamedTuple):
    identity: Identity
    # Until when the gateway would still take the token: its exp plus oidc.clock_skew, as
    # the checks allow; None when it gave no exp (an introspection answer need not).
    expires_at: float | None


async def identity_of(rt: Runtime, snapshot: Snapshot, route: Route, token: str) -> Checked:
    """Who the token says is calling, and until when, once every check has passed;
    InvalidTokenError when one fails."""
    api = snapshot.config.api
    audiences = route.config.audiences or api.audiences
    try:
        if token.count(".") == 2:
            claims = await rt.verifier.access_token(token, audiences=audiences,
                                                    any_typ=api.token_typ == "any")  # noqa: S105
        elif api.introspection:
            claims = await rt.introspector.claims(token, audiences)
        else:
            raise TokenError("not_introspected", "an opaque token, and api.introspection is "
                                                 "off")
        exp = claims.get("exp")
        oidc = snapshot.config.oidc
        return Checked(Identity.from_claims(claims, oidc.groups_claim),
                       float(exp) + oidc.clock_skew
                       if isinstance(exp, int | float) and not isinstance(exp, bool) else None)
    except TokenError as exc:
        raise InvalidTokenError(f"route {route.name}: bearer token refused: {exc}",
                                description=_DESCRIPTIONS.get(exc.code, "the token is not "
                                                              "valid")) from None
