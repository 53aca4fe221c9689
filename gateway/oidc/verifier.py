"""One place where tokens from the IdP are verified: metadata, the key for the token's kid,
and validation, for ID tokens (login and refresh), logout tokens (back-channel logout) and
access tokens that API clients send (bearer.py).

The callers only translate a refusal into their own error (a login error, a failed refresh, a
400 to the IdP), using the TokenError's code. The IdP's metadata and keys come from the
Provider, which bounds JWKS refetches; which refetch budget applies depends on where the token
came from: the token endpoint (trusted channel) or anyone on the network.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from gateway.oidc import tokens
from gateway.oidc.provider import Provider


class Verifier:
    def __init__(self, provider: Provider, *, client_id: str, client_secret: str,
                 leeway: float, clock: Callable[[], float]) -> None:
        self._provider = provider
        self._client_id = client_id
        self._client_secret = client_secret
        self._leeway = int(leeway)
        self._clock = clock

    async def _expectations(self) -> tokens.Expectations:
        metadata = await self._provider.metadata()
        return tokens.Expectations(
            issuer=metadata.issuer, client_id=self._client_id,
            client_secret=self._client_secret, algorithms=metadata.id_token_signing_algs,
            leeway=self._leeway, now=self._clock)

    async def id_token(self, token: str, *, nonce: str | None, access_token: str,
                       max_age: int | None = None,
                       acr_values: Collection[str] = ()) -> dict[str, object]:
        """Claims of an ID token from the token endpoint, issued with `access_token`
        (checked against at_hash when the token has one), meeting the max_age and
        acr_values the login asked for; TokenError when refused."""
        expect = await self._expectations()
        keys = await self._provider.keys(tokens.kid_of(token), trusted=True)
        return tokens.validate_id_token(token, keys, expect, nonce=nonce,
                                        access_token=access_token, max_age=max_age,
                                        acr_values=acr_values)

    async def logout_token(self, token: str) -> dict[str, object]:
        """Claims of a back-channel logout token (anyone can POST one); TokenError when
        refused. The caller checks jti replay, which needs the store."""
        expect = await self._expectations()
        keys = await self._provider.keys(tokens.kid_of(token), trusted=False)
        return tokens.validate_logout_token(token, keys, expect)

    async def access_token(self, token: str, *, audiences: tuple[str, ...],
                           any_typ: bool) -> dict[str, object]:
        """Claims of a JWT access token an API client sent (RFC 9068): anyone can send one,
        so unknown kids cost refetches from the untrusted budget; TokenError when refused."""
        issuer = (await self._provider.metadata()).issuer
        keys = await self._provider.keys(tokens.kid_of(token), trusted=False)
        return tokens.validate_access_token(token, keys, issuer=issuer, audiences=audiences,
                                            any_typ=any_typ, leeway=self._leeway,
                                            now=self._clock)

    @property
    def leeway(self) -> int:
        return self._leeway
