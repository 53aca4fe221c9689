"""The OpenID Provider as the gateway knows it: discovery metadata and the JWKS, cached.

Discovery is loaded at startup and retried with backoff when it fails, so a gateway started
while the IdP is down recovers by itself. Every call has the configured timeout. aiohttp and
JSON errors are translated here.

The JWKS is refetched when a token names a kid it lacks: a key rotation is then accepted on
the first token signed with the new key, however recently the set was fetched. Forged kids
must not make the gateway hammer the IdP, so refetches are bounded twice:
- per kid: a kid still missing after a refetch is not looked for again for UNKNOWN_KID_RETRY
  (remembered apart for the two kinds of token below, so a forged logout token naming the
  next kid cannot hold up the login that first uses it);
- overall, for tokens anyone can send (back-channel logout): UNTRUSTED_REFETCHES per
  UNTRUSTED_WINDOW. Tokens from the token endpoint (logins, refreshes) are not held to that
  budget, since each needs a real code or refresh token, so a flood of forged logout tokens
  cannot delay the first login after a rotation.
Failed fetches count like successful ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from yarl import URL

from gateway.errors import IdPError, IdPTimeoutError, IdPUnavailableError, IssuerMismatchError

UNKNOWN_KID_RETRY = 30.0  # seconds before a kid missing from the JWKS is looked for again
UNTRUSTED_REFETCHES = 6  # JWKS refetches per window caused by tokens anyone can send
UNTRUSTED_WINDOW = 60.0
_MAX_UNKNOWN_KIDS = 1024  # bounds the memory forged kids can take
# A login is only started (the browser sent to the IdP) if the IdP answered within this long;
# otherwise discovery is fetched again first, so a dead IdP gets a 503 page, not a dead link.
DISCOVERY_RECHECK = 30.0
DISCOVERY_BACKOFF_MAX = 60.0


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    end_session_endpoint: str | None
    id_token_signing_algs: tuple[str, ...]
    introspection_endpoint: str | None = None

    @classmethod
    def from_document(cls, doc: dict[str, Any], expected_issuer: str) -> ProviderMetadata:
        # OIDC Discovery §4.3: the issuer in the document must equal the configured one exactly.
        if doc.get("issuer") != expected_issuer:
            raise IssuerMismatchError.between(doc.get("issuer"), expected_issuer)
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(doc.get(name), str):
                raise IdPError(f"discovery document has no {name}")
        algs = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
        return cls(
            issuer=doc["issuer"],
            authorization_endpoint=doc["authorization_endpoint"],
            token_endpoint=doc["token_endpoint"],
            jwks_uri=doc["jwks_uri"],
            userinfo_endpoint=doc.get("userinfo_endpoint"),
            end_session_endpoint=doc.get("end_session_endpoint"),
            introspection_endpoint=doc.get("introspection_endpoint")
            if isinstance(doc.get("introspection_endpoint"), str) else None,
            # "none" is never acceptable for an ID token from the token endpoint.
            id_token_signing_algs=tuple(a for a in algs if isinstance(a, str) and a != "none"),
        )


async def fetch_json(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    timeout: float,  # noqa: ASYNC109  (applied to the one call as a ClientTimeout)
    what: str,
    **kwargs: Any,
) -> tuple[int, Any]:
    """One IdP call: (status, parsed JSON or None). Network failures become IdP errors that
    name the URL (never its query)."""
    where = f"{what} {URL(url).with_query(None).with_fragment(None)}"
    try:
        async with http.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout),
                                allow_redirects=False, **kwargs) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = None
            return resp.status, body
    except TimeoutError as exc:
        raise IdPTimeoutError(f"{where}: no answer within {timeout:g}s") from exc
    except aiohttp.ClientError as exc:
        raise IdPUnavailableError(f"{where}: {type(exc).__name__}") from exc


class Provider:
    def __init__(self, http: aiohttp.ClientSession, issuer: str, *, timeout: float,
                 clock: Callable[[], float],
                 observe: Callable[[str, bool], None] | None = None) -> None:
        self._http = http
        self._observe = observe  # told of each fetch: "discovery" or "jwks", and if it worked
        self._issuer = issuer
        self._timeout = timeout
        self._clock = clock
        self._metadata: ProviderMetadata | None = None
        self._keys: KeySet | None = None
        # (trusted, kid) -> when a refetch did not find it
        self._unknown_kids: dict[tuple[bool, str], float] = {}
        self._untrusted_window = float("-inf")
        self._untrusted_refetches = 0
        self._next_discovery = float("-inf")
        self._discovered_at = float("-inf")
        self._backoff = 1.0
        self._last_failure: IdPError | IdPUnavailableError | None = None
        self._discovery_lock = asyncio.Lock()
        self._keys_lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self._metadata is not None

    async def metadata(self) -> ProviderMetadata:
        if self._metadata is not None:
            return self._metadata
        async with self._discovery_lock:
            if self._metadata is None:
                self._metadata = await self._discover_with_backoff()
            return self._metadata

    async def metadata_for_login(self) -> ProviderMetadata:
        """Metadata from an IdP known to be up now (re-fetched after DISCOVERY_RECHECK).

        A failure here does not drop the cached metadata: existing sessions go on."""
        if self._metadata is None or self._clock() - self._discovered_at < DISCOVERY_RECHECK:
            return await self.metadata()
        async with self._discovery_lock:
            if self._clock() - self._discovered_at >= DISCOVERY_RECHECK:
                self._metadata = await self._discover_with_backoff()
            return self._metadata

    async def _discover_with_backoff(self) -> ProviderMetadata:
        if self._clock() < self._next_discovery:
            if isinstance(self._last_failure, IssuerMismatchError):  # a config error: say so
                failure = self._last_failure
                raise IssuerMismatchError.between(failure.found, failure.configured)
            raise IdPUnavailableError(f"discovery failed recently, waiting to retry: "
                                      f"{self._last_failure.detail if self._last_failure else ''}")
        try:
            metadata = await self._discover()
        except (IdPError, IdPUnavailableError) as exc:
            self._last_failure = exc
            self._next_discovery = self._clock() + self._backoff
            self._backoff = min(self._backoff * 2, DISCOVERY_BACKOFF_MAX)
            raise
        self._backoff = 1.0
        self._discovered_at = self._clock()
        return metadata

    async def _discover(self) -> ProviderMetadata:
        with self._fetching("discovery"):
            url = self._issuer.rstrip("/") + "/.well-known/openid-configuration"
            status, doc = await fetch_json(self._http, "GET", url, timeout=self._timeout,
                                           what="discovery")
            if status != 200 or not isinstance(doc, dict):
                raise IdPUnavailableError(f"discovery answered HTTP {status}")
            return ProviderMetadata.from_document(doc, self._issuer)

    @contextlib.contextmanager
    def _fetching(self, document: str) -> Iterator[None]:
        ok = False
        try:
            yield
            ok = True
        finally:
            if self._observe is not None:
                self._observe(document, ok)

    async def keys(self, kid: str | None, *, trusted: bool) -> KeySet:
        """The JWKS, refetched when it lacks `kid` (bounded: see the module docstring).

        `trusted`: the token came from the token endpoint, not from anyone on the network."""
        if self._keys is not None and (kid is None or _has_kid(self._keys, kid)):
            return self._keys
        metadata = await self.metadata()
        async with self._keys_lock:
            missing = self._keys is None or (kid is not None and not _has_kid(self._keys, kid))
            if missing and self._may_refetch(kid, trusted=trusted):
                try:
                    self._keys = await self._fetch_keys(metadata.jwks_uri)
                finally:
                    if kid is not None and (self._keys is None or not _has_kid(self._keys, kid)):
                        self._remember_unknown((trusted, kid))
        if self._keys is None:
            raise IdPUnavailableError("JWKS not available")
        return self._keys

    def _may_refetch(self, kid: str | None, *, trusted: bool) -> bool:
        now = self._clock()
        seen = self._unknown_kids.get((trusted, kid), float("-inf")) if kid else float("-inf")
        if now - seen < UNKNOWN_KID_RETRY:
            return False
        if trusted:
            return True
        if now - self._untrusted_window >= UNTRUSTED_WINDOW:
            self._untrusted_window, self._untrusted_refetches = now, 0
        if self._untrusted_refetches >= UNTRUSTED_REFETCHES:
            return False
        self._untrusted_refetches += 1
        return True

    def _remember_unknown(self, kid: tuple[bool, str]) -> None:
        now = self._clock()
        if len(self._unknown_kids) >= _MAX_UNKNOWN_KIDS:
            self._unknown_kids = {k: t for k, t in self._unknown_kids.items()
                                  if now - t < UNKNOWN_KID_RETRY}
            if len(self._unknown_kids) >= _MAX_UNKNOWN_KIDS:
                self._unknown_kids.clear()  # the overall budget still bounds untrusted kids
        self._unknown_kids[kid] = now

    async def _fetch_keys(self, jwks_uri: str) -> KeySet:
        with self._fetching("jwks"):
            status, doc = await fetch_json(self._http, "GET", jwks_uri,
                                           timeout=self._timeout, what="jwks")
            if status != 200 or not isinstance(doc, dict):
                raise IdPUnavailableError(f"JWKS answered HTTP {status}")
            try:
                return KeySet.import_key_set(doc)  # type: ignore[arg-type]  # joserfc checks
            except (JoseError, ValueError, KeyError, TypeError) as exc:
                raise IdPError("JWKS is not a valid key set") from exc


def _has_kid(keys: KeySet, kid: str) -> bool:
    return any(key.kid == kid for key in keys.keys)
