"""Provider metadata and JWKS: exact issuer, backoff on failure, bounded key refetch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import FakeClock, free_port
from joserfc.jwk import KeySet, RSAKey

from gateway.errors import IdPError, IdPTimeoutError, IdPUnavailableError
from gateway.oidc import introspection
from gateway.oidc.flow import Client
from gateway.oidc.introspection import Introspector
from gateway.oidc.provider import (
    DISCOVERY_RECHECK,
    UNKNOWN_KID_RETRY,
    UNTRUSTED_REFETCHES,
    UNTRUSTED_WINDOW,
    Provider,
)
from gateway.oidc.tokens import TokenError


@dataclass
class FakeIdP:
    issuer: str = ""
    discovery: dict[str, Any] = field(default_factory=dict)
    discovery_status: int = 200
    jwks_status: int = 200
    keys: list[RSAKey] = field(default_factory=lambda: [
        RSAKey.generate_key(2048, parameters={"kid": "k1"})])
    delay: float = 0.0
    hits: dict[str, int] = field(default_factory=lambda: {"discovery": 0, "jwks": 0,
                                                          "introspection": 0})
    # RFC 7662: token -> the answer (default {"active": false}); the client's credentials
    # seen on each call
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    introspection_status: int = 200
    introspected_with: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.Response:
            self.hits["discovery"] += 1
            await asyncio.sleep(self.delay)
            doc = {"issuer": self.issuer, "authorization_endpoint": self.issuer + "/auth",
                   "token_endpoint": self.issuer + "/token", "jwks_uri": self.issuer + "/jwks",
                   "introspection_endpoint": self.issuer + "/introspect",
                   "id_token_signing_alg_values_supported": ["RS256", "none"],
                   **self.discovery}
            return web.json_response(doc, status=self.discovery_status)

        async def jwks(request: web.Request) -> web.Response:
            self.hits["jwks"] += 1
            return web.json_response(KeySet(self.keys).as_dict(private=False),
                                     status=self.jwks_status)

        async def introspection(request: web.Request) -> web.Response:
            self.hits["introspection"] += 1
            form = await request.post()
            self.introspected_with.append(request.headers.get("Authorization", ""))
            await asyncio.sleep(self.delay)
            answer = self.answers.get(str(form.get("token")), {"active": False})
            return web.json_response(answer, status=self.introspection_status)

        app = web.Application()
        app.router.add_post("/introspect", introspection)
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        return app


ProviderFactory = Callable[[FakeIdP], Awaitable[Provider]]


@pytest.fixture
async def make_provider(clock: FakeClock) -> AsyncIterator[ProviderFactory]:
    servers: list[TestServer] = []
    http = aiohttp.ClientSession()

    async def make(idp: FakeIdP, idp_timeout: float = 2.0) -> Provider:
        server = TestServer(idp.app(), host="127.0.0.1", port=free_port())
        await server.start_server()
        servers.append(server)
        idp.issuer = idp.issuer or str(server.make_url("")).rstrip("/")
        return Provider(http, idp.issuer, timeout=idp_timeout, clock=clock)

    yield make
    await http.close()
    for server in servers:
        await server.close()


async def test_metadata_is_loaded_once_and_none_is_dropped(make_provider: ProviderFactory) -> None:
    idp = FakeIdP()
    provider = await make_provider(idp)
    metadata = await provider.metadata()
    await provider.metadata()
    assert idp.hits["discovery"] == 1
    assert metadata.token_endpoint == idp.issuer + "/token"
    assert metadata.id_token_signing_algs == ("RS256",)
    assert provider.loaded


async def test_issuer_mismatch_is_refused(make_provider: ProviderFactory) -> None:
    """Mix-up: a discovery document claiming another issuer is not this IdP's."""
    idp = FakeIdP(discovery={"issuer": "https://evil.example.com"})
    provider = await make_provider(idp)
    with pytest.raises(IdPError, match="issuer"):
        await provider.metadata()


async def test_failed_discovery_backs_off_then_recovers(make_provider: ProviderFactory,
                                                        clock: FakeClock) -> None:
    idp = FakeIdP(discovery_status=500)
    provider = await make_provider(idp)
    with pytest.raises(IdPUnavailableError):
        await provider.metadata()
    with pytest.raises(IdPUnavailableError, match="waiting to retry"):
        await provider.metadata()
    assert idp.hits["discovery"] == 1  # the backoff spared the IdP
    idp.discovery_status = 200
    clock.advance(1.1)
    assert (await provider.metadata()).issuer == idp.issuer


def kids(keys: KeySet) -> set[str | None]:
    return {key.kid for key in keys.keys}


async def test_a_rotated_key_is_accepted_on_its_first_token_right_after_a_fetch(
        make_provider: ProviderFactory, clock: FakeClock) -> None:
    """Genuine rotation: the IdP starts signing with a new kid seconds after our last fetch."""
    idp = FakeIdP()
    provider = await make_provider(idp)
    assert kids(await provider.keys("k1", trusted=True)) == {"k1"}
    idp.keys.append(RSAKey.generate_key(2048, parameters={"kid": "k2"}))
    clock.advance(1)
    assert kids(await provider.keys("k2", trusted=True)) == {"k1", "k2"}
    assert kids(await provider.keys("k2", trusted=False)) == {"k1", "k2"}
    assert idp.hits["jwks"] == 2  # a known kid costs nothing


async def test_a_kid_missing_after_a_refetch_is_not_looked_for_again_soon(
        make_provider: ProviderFactory, clock: FakeClock) -> None:
    idp = FakeIdP()
    provider = await make_provider(idp)
    await provider.keys("k1", trusted=True)
    for trusted in (True, True, False, False):
        await provider.keys("forged", trusted=trusted)
    assert idp.hits["jwks"] == 3  # one refetch for that kid from each kind of token
    clock.advance(UNKNOWN_KID_RETRY)
    await provider.keys("forged", trusted=True)
    assert idp.hits["jwks"] == 4


async def test_a_forged_logout_token_naming_the_next_kid_cannot_hold_up_the_login(
        make_provider: ProviderFactory, clock: FakeClock) -> None:
    idp = FakeIdP()
    provider = await make_provider(idp)
    await provider.keys("k1", trusted=True)
    await provider.keys("k2", trusted=False)  # a guess at the next kid, before the rotation
    idp.keys.append(RSAKey.generate_key(2048, parameters={"kid": "k2"}))
    clock.advance(5)
    assert "k2" in kids(await provider.keys("k2", trusted=True))


async def test_forged_kids_from_anyone_are_bounded_overall_but_logins_are_not_starved(
        make_provider: ProviderFactory, clock: FakeClock) -> None:
    """IdP hammering: back-channel logout tokens anyone can POST, each with a new kid."""
    idp = FakeIdP()
    provider = await make_provider(idp)
    await provider.keys("k1", trusted=True)
    for i in range(50):
        await provider.keys(f"forged-{i}", trusted=False)
    assert idp.hits["jwks"] == 1 + UNTRUSTED_REFETCHES
    idp.keys.append(RSAKey.generate_key(2048, parameters={"kid": "k2"}))
    assert "k2" in kids(await provider.keys("k2", trusted=True))  # a login after a rotation
    clock.advance(UNTRUSTED_WINDOW)
    await provider.keys("forged-new", trusted=False)
    assert idp.hits["jwks"] == 1 + UNTRUSTED_REFETCHES + 2


async def test_concurrent_tokens_with_a_new_kid_cause_one_refetch(
        make_provider: ProviderFactory) -> None:
    idp = FakeIdP()
    provider = await make_provider(idp)
    await provider.keys("k1", trusted=True)
    idp.keys.append(RSAKey.generate_key(2048, parameters={"kid": "k2"}))
    results = await asyncio.gather(*(provider.keys("k2", trusted=True) for _ in range(20)))
    assert all("k2" in kids(keys) for keys in results)
    assert idp.hits["jwks"] == 2


async def test_hanging_idp_times_out(make_provider: ProviderFactory) -> None:
    provider = await make_provider(FakeIdP(delay=3), idp_timeout=0.3)
    with pytest.raises(IdPTimeoutError):
        await provider.metadata()


async def test_unreachable_idp_is_unavailable(clock: FakeClock) -> None:
    async with aiohttp.ClientSession() as http:
        provider = Provider(http, f"http://127.0.0.1:{free_port()}", timeout=1, clock=clock)
        with pytest.raises(IdPUnavailableError):
            await provider.metadata()


async def test_logins_recheck_a_quiet_idp_and_refuse_when_it_is_gone(
        make_provider: ProviderFactory, clock: FakeClock) -> None:
    idp = FakeIdP()
    provider = await make_provider(idp)
    await provider.metadata_for_login()
    await provider.metadata_for_login()
    assert idp.hits["discovery"] == 1  # answered recently: no recheck
    clock.advance(DISCOVERY_RECHECK)
    await provider.metadata_for_login()
    assert idp.hits["discovery"] == 2
    idp.discovery_status = 500  # the IdP breaks
    clock.advance(DISCOVERY_RECHECK)
    with pytest.raises(IdPUnavailableError):
        await provider.metadata_for_login()
    assert (await provider.metadata()).issuer == idp.issuer  # sessions keep the metadata


async def test_failed_jwks_refetches_are_bounded_too(
        make_provider: ProviderFactory, clock: FakeClock) -> None:
    """IdP hammering: with the JWKS endpoint failing, forged kids must not each cause a fetch."""
    idp = FakeIdP()
    provider = await make_provider(idp)
    await provider.keys("k1", trusted=True)
    idp.jwks_status = 500
    for i in range(20):
        with contextlib.suppress(IdPUnavailableError):
            await provider.keys(f"forged-{i}", trusted=False)
    for _ in range(3):
        with contextlib.suppress(IdPUnavailableError):
            await provider.keys("forged-0", trusted=True)
    assert idp.hits["jwks"] == 1 + UNTRUSTED_REFETCHES + 1
    assert kids(await provider.keys("k1", trusted=False)) == {"k1"}  # the cache still serves


# --- RFC 7662 introspection (oidc/introspection.py) ---

API = "https://api.example.com"


def active(idp: FakeIdP, **changes: Any) -> dict[str, Any]:
    answer = {"active": True, "iss": idp.issuer, "sub": "robot", "aud": API,
              "token_type": "Bearer", "scope": "read", **changes}
    return {name: value for name, value in answer.items() if value is not None}


@pytest.fixture
async def introspector(make_provider: ProviderFactory, clock: FakeClock
                       ) -> AsyncIterator[Callable[[FakeIdP], Awaitable[Introspector]]]:
    async with aiohttp.ClientSession() as http:
        async def make(idp: FakeIdP) -> Introspector:
            provider = await make_provider(idp)
            client = Client("gateway", "s3cret", "https://gw/oauth2/callback", ("openid",),
                            "client_secret_basic", 2.0)
            return Introspector(http, provider, client, endpoint=None, cache_ttl=60,
                                leeway=0, clock=clock)

        yield make


Maker = Callable[[FakeIdP], Awaitable[Introspector]]


async def test_an_active_token_for_this_api_gives_its_claims(introspector: Maker) -> None:
    idp = FakeIdP()
    intro = await introspector(idp)
    idp.answers["t"] = active(idp)
    assert (await intro.claims("t", (API,)))["sub"] == "robot"
    assert idp.introspected_with == ["Basic Z2F0ZXdheTpzM2NyZXQ="]  # the client's own


@pytest.mark.parametrize(("changes", "code"), [
    ({"active": False}, "inactive"),
    ({"active": "true"}, "inactive"),  # only the JSON boolean counts
    ({"aud": "https://other.example.com"}, "claim_aud"),
    ({"aud": None}, "claim_aud"),
    ({"iss": "https://evil.example.com"}, "inactive"),
    ({"token_type": "refresh_token"}, "inactive"),
    ({"exp": 1}, "inactive"),
    ({"nbf": 4_000_000_000}, "inactive"),
    ({"sub": None, "client_id": None}, "inactive"),
])
async def test_answers_that_do_not_make_a_usable_token(
        introspector: Maker, changes: dict[str, Any], code: str) -> None:
    idp = FakeIdP()
    intro = await introspector(idp)
    idp.answers["t"] = active(idp, **changes)
    with pytest.raises(TokenError) as caught:
        await intro.claims("t", (API,))
    assert caught.value.code == code


async def test_a_client_credentials_token_is_its_client(introspector: Maker) -> None:
    idp = FakeIdP()
    intro = await introspector(idp)
    idp.answers["t"] = active(idp, sub=None, client_id="robot-7")
    assert (await intro.claims("t", (API,)))["sub"] == "robot-7"


async def test_answers_are_cached_but_never_past_the_tokens_exp(
        introspector: Maker, clock: FakeClock) -> None:
    idp = FakeIdP()
    intro = await introspector(idp)
    idp.answers["long"] = active(idp, exp=clock() + 3600)
    idp.answers["short"] = active(idp, exp=clock() + 5)
    for _ in range(3):
        await intro.claims("long", (API,))
        await intro.claims("short", (API,))
    assert idp.hits["introspection"] == 2
    clock.advance(6)
    with pytest.raises(TokenError):  # asked again, and now expired
        await intro.claims("short", (API,))
    await intro.claims("long", (API,))
    assert idp.hits["introspection"] == 3
    clock.advance(60)  # the cache's own limit (api.introspection_cache)
    idp.answers["long"] = {"active": False}  # revoked
    with pytest.raises(TokenError):
        await intro.claims("long", (API,))


async def test_inactive_answers_are_cached_too(introspector: Maker) -> None:
    idp = FakeIdP()
    intro = await introspector(idp)
    for _ in range(3):
        with pytest.raises(TokenError):
            await intro.claims("dead", (API,))
    assert idp.hits["introspection"] == 1


async def test_concurrent_requests_with_one_token_share_one_call(introspector: Maker) -> None:
    idp = FakeIdP(delay=0.2)
    intro = await introspector(idp)
    idp.answers["t"] = active(idp)
    waiting = [asyncio.create_task(intro.claims("t", (API,))) for _ in range(10)]
    waiting[0].cancel()  # a client that gives up does not cancel the others' answer
    results = await asyncio.gather(*waiting[1:])
    assert all(claims["sub"] == "robot" for claims in results)
    assert idp.hits["introspection"] == 1


async def test_the_cache_is_bounded(introspector: Maker, monkeypatch: pytest.MonkeyPatch
                                    ) -> None:
    monkeypatch.setattr(introspection, "MAX_ENTRIES", 3)
    idp = FakeIdP()
    intro = await introspector(idp)
    for token in ("a", "b", "c", "d"):
        idp.answers[token] = active(idp)
        await intro.claims(token, (API,))
    await intro.claims("d", (API,))
    await intro.claims("a", (API,))  # evicted first: asked again
    assert idp.hits["introspection"] == 5


async def test_an_idp_that_fails_is_an_error_not_a_pass(introspector: Maker) -> None:
    idp = FakeIdP(introspection_status=500)
    intro = await introspector(idp)
    idp.answers["t"] = active(idp)
    with pytest.raises(IdPError, match="introspection endpoint answered HTTP 500"):
        await intro.claims("t", (API,))
    idp.introspection_status = 200  # a failure is not cached
    assert (await intro.claims("t", (API,)))["sub"] == "robot"
