"""RFC 7662 token introspection, for bearer tokens the gateway cannot verify itself: opaque
tokens (JWTs are verified locally, oidc/verifier.py; some IdPs, oidc-provider among them,
refuse to introspect them anyway).

The IdP is asked with the gateway's own client credentials (the same authentication as at the
token endpoint). An answer is kept in a small in-process cache for at most
`api.introspection_cache`, and an active token's never past its exp: a token revoked at the
IdP is refused within that time, and an expired one at once. Inactive answers are cached too,
so a client retrying a dead token does not cost an IdP call per request. Concurrent requests
with the same uncached token share one IdP call. The cache is bounded (least recently used
entries go first) and keyed by the token's SHA-256, so it holds no token.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from gateway.errors import IdPError
from gateway.oidc.flow import Client, client_auth, oauth_error
from gateway.oidc.provider import Provider, fetch_json
from gateway.oidc.tokens import TokenError, check_subject

MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class _Answer:
    claims: dict[str, object] | None  # None: not active (or not an access token)
    until: float  # when the cache must ask again


class Introspector:
    def __init__(self, http: aiohttp.ClientSession, provider: Provider, client: Client, *,
                 endpoint: str | None, cache_ttl: float, leeway: float,
                 clock: Callable[[], float]) -> None:
        self._http = http
        self._provider = provider
        self._client = client
        self._endpoint = endpoint
        self._cache_ttl = cache_ttl
        self._leeway = leeway
        self._clock = clock
        self._cache: OrderedDict[bytes, _Answer] = OrderedDict()
        self._pending: dict[bytes, asyncio.Task[_Answer]] = {}

    async def claims(self, token: str, audiences: tuple[str, ...]) -> dict[str, object]:
        """The active token's claims when one of `audiences` is among its aud; TokenError
        (code `inactive`, `claim_aud`, ...) otherwise."""
        key = hashlib.sha256(token.encode()).digest()
        answer = self._cached(key) or await self._shared_ask(key, token)
        if answer.claims is None:
            raise TokenError("inactive", "the IdP says the token is not active")
        _check_audience(answer.claims, audiences)
        return answer.claims

    def _cached(self, key: bytes) -> _Answer | None:
        answer = self._cache.get(key)
        if answer is None:
            return None
        if answer.until <= self._clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return answer

    async def _shared_ask(self, key: bytes, token: str) -> _Answer:
        """One IdP call per token at a time, in a task of its own: a client that gives up
        does not cancel the answer the others wait for."""
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(token))
            self._pending[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await asyncio.shield(task)

    def _done(self, key: bytes, task: asyncio.Task[_Answer]) -> None:
        del self._pending[key]
        if task.cancelled() or task.exception() is not None:
            return  # not cached: the next request asks again
        self._cache[key] = task.result()
        while len(self._cache) > MAX_ENTRIES:
            self._cache.popitem(last=False)

    async def _ask(self, token: str) -> _Answer:
        metadata = await self._provider.metadata()
        endpoint = self._endpoint or metadata.introspection_endpoint
        if endpoint is None:
            raise IdPError("the IdP's discovery document has no introspection_endpoint; set "
                           "api.introspection_endpoint")
        form = {"token": token, "token_type_hint": "access_token"}
        headers = {"Accept": "application/json", **client_auth(self._client, form)}
        status, body = await fetch_json(self._http, "POST", endpoint, data=form,
                                        headers=headers, timeout=self._client.timeout,
                                        what="introspection endpoint")
        if status != 200 or not isinstance(body, dict) or "active" not in body:
            raise IdPError(f"introspection endpoint answered HTTP {status} without an "
                           f"RFC 7662 answer{oauth_error(body)}")
        now = self._clock()
        until = now + self._cache_ttl
        if body["active"] is not True:  # RFC 7662 §2.2: a JSON boolean; anything else: no
            return _Answer(None, until)
        try:
            _check_active(body, metadata.issuer, now, self._leeway)
        except TokenError:
            return _Answer(None, until)  # not usable here, and will not become so
        exp = body.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            until = min(until, exp)
        return _Answer(body, until)


def _check_active(body: dict[str, object], issuer: str, now: float, leeway: float) -> None:
    """What an active answer must also say for the token to be used as a bearer token: this
    IdP issued it (when it says), it is an access token (refresh tokens are active too),
    it is within its lifetime, and it names a subject (for the identity headers)."""
    if "iss" in body and body["iss"] != issuer:
        raise TokenError("claim_iss", "introspection names another issuer")
    token_type = body.get("token_type")
    if token_type is not None and (not isinstance(token_type, str)
                                   or token_type.lower() != "bearer"):
        raise TokenError("token_type", f"token_type {token_type!r} is not Bearer")
    for name, sign in (("exp", 1), ("nbf", -1)):
        value = body.get(name)
        if value is None:
            continue
        # exp must be ahead of now, nbf behind it, each give or take the leeway.
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or sign * (value - now) <= -leeway:
            raise TokenError(f"claim_{name}", f"{name} is not met")
    if "sub" not in body and isinstance(body.get("client_id"), str):
        # A client's own token (client credentials): the client is the subject, as RFC 9068
        # §2.2 has it in a JWT.
        body["sub"] = body["client_id"]
    check_subject(body)


def _check_audience(claims: dict[str, object], audiences: tuple[str, ...]) -> None:
    """RFC 9068 §4 as for JWTs: the token must be meant for this API, or a token the IdP
    issued for any other service would be let in."""
    aud = claims.get("aud")
    values = aud if isinstance(aud, list) else [aud]
    if not any(isinstance(value, str) and value in audiences for value in values):
        raise TokenError("claim_aud", "the token is not meant for this API (aud)")
