"""The authorization code flow as a confidential client: request, code exchange, userinfo.

Builds the authorization URL (state, nonce, PKCE S256), exchanges the code with
client_secret_basic or client_secret_post, and fetches userinfo. Network failures are
translated in provider.fetch_json; protocol failures here become IdPError/LoginError.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from yarl import URL

from gateway.errors import IdPError, LoginError
from gateway.oidc.provider import ProviderMetadata, fetch_json
from gateway.oidc.token_set import TokenSet

_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]{1,16384}$")


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    client_secret: str
    redirect_uri: str
    scopes: tuple[str, ...]
    auth_method: str  # client_secret_basic | client_secret_post
    timeout: float


@dataclass(frozen=True, slots=True)
class AuthRequest:
    state: str
    nonce: str
    code_verifier: str
    url: str


def _s256(verifier: str) -> str:
    # RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier))) without padding.
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def begin(metadata: ProviderMetadata, client: Client, *, max_age: int | None = None,
          acr_values: Sequence[str] = ()) -> AuthRequest:
    """The authorization request; `max_age` and `acr_values` (Core §3.1.2.1) ask for a
    sign-in no older than that, or of that strength (a step-up)."""
    state = secrets.token_urlsafe(32)
    nonce = secrets.token_urlsafe(32)
    verifier = secrets.token_urlsafe(48)  # 64 chars, within RFC 7636's 43..128
    query = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": client.redirect_uri,
        "scope": " ".join(client.scopes),
        "state": state,
        "nonce": nonce,
        "code_challenge": _s256(verifier),
        "code_challenge_method": "S256",
    }
    if max_age is not None:
        query["max_age"] = str(max_age)
    if acr_values:
        query["acr_values"] = " ".join(acr_values)
    url = URL(metadata.authorization_endpoint).update_query(query)
    return AuthRequest(state, nonce, verifier, str(url))


def client_auth(client: Client, form: dict[str, str]) -> dict[str, str]:
    """The client's authentication for a call to the IdP: added to `form`, or the
    headers to send (token endpoint, introspection)."""
    if client.auth_method == "client_secret_post":
        form.update(client_id=client.client_id, client_secret=client.client_secret)
        return {}
    # RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding.
    user = quote(client.client_id, safe="") + ":" + quote(client.client_secret, safe="")
    return {"Authorization": "Basic " + base64.b64encode(user.encode()).decode()}


def oauth_error(body: object) -> str:
    """An OAuth error response's error and error_description (RFC 6749 §5.2), fit for a log
    line: printable, bounded."""
    if not isinstance(body, dict):
        return ""
    parts = [str(body.get(name))[:200] for name in ("error", "error_description")
             if body.get(name) is not None]
    text = ": ".join(parts)
    return f" ({text})" if text and text.isprintable() else ""


def _without_query(url: str) -> str:
    return str(URL(url).with_query(None).with_fragment(None))


class InvalidGrantError(LoginError):
    """The IdP no longer honours the code or refresh token: the login or session is over."""


async def _token_request(http: aiohttp.ClientSession, metadata: ProviderMetadata,
                         client: Client, form: dict[str, str], *, now: float,
                         previous: TokenSet | None = None) -> TokenSet:
    headers = {"Accept": "application/json", **client_auth(client, form)}
    status, body = await fetch_json(http, "POST", metadata.token_endpoint, data=form,
                                    headers=headers, timeout=client.timeout,
                                    what="token endpoint")
    if status == 400 and isinstance(body, dict) and body.get("error") == "invalid_grant":
        raise InvalidGrantError(f"token endpoint: invalid_grant ({form['grant_type']})")
    if status != 200 or not isinstance(body, dict):
        raise IdPError(f"token endpoint {_without_query(metadata.token_endpoint)} answered "
                       f"HTTP {status}{oauth_error(body)}")
    access = body.get("access_token")
    # RFC 6749 §6 / Core §12.2: a refresh may omit the ID and refresh tokens: keep the old ones.
    id_token = body.get("id_token") or (previous.id_token if previous else None)
    refresh = body.get("refresh_token") or (previous.refresh_token if previous else None)
    if not isinstance(access, str) or not isinstance(id_token, str):
        raise IdPError("token response lacks access_token or id_token")
    # The access token goes into header values (userinfo, upstreams): visible ASCII only.
    if not _TOKEN_CHARS.fullmatch(access):
        raise IdPError("token response has an access_token that cannot be sent in a header")
    if str(body.get("token_type", "")).lower() != "bearer":
        raise IdPError("token response has a token_type other than Bearer")
    expires_in = body.get("expires_in")
    return TokenSet(
        access_token=access,
        id_token=id_token,
        refresh_token=refresh if isinstance(refresh, str) else None,
        expires_at=now + expires_in if isinstance(expires_in, int | float) else None,
        issued_at=now,
    )


async def exchange(http: aiohttp.ClientSession, metadata: ProviderMetadata, client: Client,
                   code: str, code_verifier: str, *, now: float) -> TokenSet:
    form = {"grant_type": "authorization_code", "code": code,
            "redirect_uri": client.redirect_uri, "code_verifier": code_verifier}
    return await _token_request(http, metadata, client, form, now=now)


async def refresh(http: aiohttp.ClientSession, metadata: ProviderMetadata, client: Client,
                  tokens: TokenSet, *, now: float) -> TokenSet:
    assert tokens.refresh_token is not None
    form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
    return await _token_request(http, metadata, client, form, now=now, previous=tokens)


async def with_userinfo(http: aiohttp.ClientSession, metadata: ProviderMetadata, client: Client,
                        access_token: str, claims: dict[str, object], *,
                        wanted: tuple[str, ...], always: bool = False) -> dict[str, object]:
    """ID token claims, completed from userinfo when some `wanted` claim is missing (or
    `always`); the ID token's own claims win."""
    if not metadata.userinfo_endpoint or not (always or any(c not in claims for c in wanted)):
        return claims
    info = await userinfo(http, metadata, client, access_token)
    # OIDC Core §5.3.2: userinfo's sub must be the ID token's, or the answer is not ours.
    if info.get("sub") != claims["sub"]:
        raise IdPError("userinfo sub differs from the ID token's sub")
    return {**info, **claims}


async def userinfo(http: aiohttp.ClientSession, metadata: ProviderMetadata, client: Client,
                   access_token: str) -> dict[str, object]:
    assert metadata.userinfo_endpoint is not None
    status, body = await fetch_json(
        http, "GET", metadata.userinfo_endpoint, timeout=client.timeout, what="userinfo",
        headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
    )
    if status != 200 or not isinstance(body, dict):
        raise IdPError(f"userinfo answered HTTP {status} (signed userinfo is not supported)")
    return body
