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
from gateway.oidc.provider import (
    DISCOVERY_RECHECK,
    UNKNOWN_KID_RETRY,
    UNTRUSTED_REFETCHES,
    UNTRUSTED_WINDOW,
    Provider,
)


@dataclass
class FakeIdP:
    issuer: str = ""
    discovery: dict[str, Any] = field(default_factory=dict)
    discovery_status: int = 200
    jwks_status: int = 200
    keys: list[RSAKey] = field(default_factory=lambda: [
        RSAKey.generate_key(2048, parameters={"kid": "k1"})])
    delay: float = 0.0
    hits: dict[str, int] = field(default_factory=lambda: {"discovery": 0, "jwks": 0})

    def app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.Response:
            self.hits["discovery"] += 1
            await asyncio.sleep(self.delay)
            doc = {"issuer": self.issuer, "authorization_endpoint": self.issuer + "/auth",
                   "token_endpoint": self.issuer + "/token", "jwks_uri": self.issuer + "/jwks",
                   "id_token_signing_alg_values_supported": ["RS256", "none"],
                   **self.discovery}
            return web.json_response(doc, status=self.discovery_status)

        async def jwks(request: web.Request) -> web.Response:
            self.hits["jwks"] += 1
            return web.json_response(KeySet(self.keys).as_dict(private=False),
                                     status=self.jwks_status)

        app = web.Application()
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
