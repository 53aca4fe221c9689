"""The session store on real Redis deployments: TLS, Sentinel and a 3-master Cluster.

Each runs the store operations the gateway depends on (atomic ones included) and a full
login through a gateway using it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import StackFactory, login
from redis_servers import (
    Deployment,
    missing_binaries,
    start_cluster,
    start_sentinel,
    start_tls,
)

from gateway import config as config_module
from gateway.identity import Identity
from gateway.oidc.token_set import TokenSet
from gateway.sessions.backends import open_backend
from gateway.sessions.keys import Keys
from gateway.sessions.model import LoginAttempt
from gateway.sessions.store import SessionStore

pytestmark = pytest.mark.e2e

STARTERS = {"tls": start_tls, "sentinel": start_sentinel, "cluster": start_cluster}


@pytest.fixture(scope="module", params=sorted(STARTERS))
def deployment(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    reason = missing_binaries()
    if reason:
        pytest.skip(reason)
    started = STARTERS[request.param](tmp_path_factory.mktemp(request.param))
    yield started
    started.stop()


def session_section(deployment: Deployment) -> dict[str, object]:
    section: dict[str, object] = {"store": deployment.url}
    if deployment.ca_file:
        section["redis_tls"] = {"ca_file": str(deployment.ca_file)}
    return section


async def test_store_operations_work_on_the_deployment(deployment: Deployment) -> None:
    config = config_module.SessionConfig.model_validate(session_section(deployment))
    backend = open_backend(config, clock=time.time)
    keys = Keys.for_deployment("https://idp.example.com", "gateway", None)
    store = SessionStore(backend, keys, idle_timeout=600, max_lifetime=3600, clock=time.time)
    try:
        await backend.ping()
        identity = Identity("alice-" + deployment.url[-6:], "alice@example.com", True,
                            sid="sid-" + deployment.url[-6:])
        cookie = await store.create(identity, TokenSet("at", "it", "rt", time.time() + 60))
        loaded = await store.load(cookie.value)
        assert loaded is not None and loaded.session.identity == identity
        assert [i.storage_id for i in await store.registry.by_sid(identity.sid or "")] == [
            cookie.storage_id]
        assert cookie.storage_id in {i.storage_id for i in await store.registry.all()}
        await store.save_attempt("state", LoginAttempt("n", "v", "/", "b"))
        assert await store.pop_attempt("state") is not None
        assert await store.pop_attempt("state") is None
        assert await backend.add_once("gateway:lock:{x}", 5, b"me")
        assert not await backend.add_once("gateway:lock:{x}", 5, b"other")
        await backend.delete_if("gateway:lock:{x}", b"other")  # not the owner: no effect
        assert not await backend.add_once("gateway:lock:{x}", 5, b"other")
        await backend.delete_if("gateway:lock:{x}", b"me")
        assert await backend.add_once("gateway:lock:{x}", 5, b"other")
        assert await store.registry.revoke(await store.registry.by_user(identity.sub)) == 1
        assert await store.load(cookie.value) is None
    finally:
        await backend.aclose()


async def test_session_caches_hear_revocations_on_the_deployment(
        deployment: Deployment) -> None:
    """The invalidation channel (pub/sub) works on TLS, Sentinel and Cluster: a cached copy in
    one store is dropped when another store revokes the session."""
    config = config_module.SessionConfig.model_validate(session_section(deployment))
    backends = [open_backend(config, clock=time.time) for _ in range(2)]
    keys = Keys.for_deployment("https://idp.example.com", "gateway-cache", None)
    here, there = (SessionStore(backend, keys, idle_timeout=600, max_lifetime=3600,
                                clock=time.time, cache_ttl=10.0) for backend in backends)
    follow = asyncio.create_task(here.follow_invalidations())
    try:
        for _ in range(300):
            if here.recent.on:
                break
            await asyncio.sleep(0.01)
        assert here.recent.on, "the store never confirmed its subscription"
        cookie = await there.create(Identity("carol", None, False), TokenSet("at", "it"))
        assert await here.load(cookie.value) is not None  # cached now
        loaded = await there.load(cookie.value)
        assert loaded is not None
        await there.delete(loaded)
        started = time.monotonic()
        while await here.load(cookie.value) is not None:
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.01)
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        for backend in backends:
            await backend.aclose()


async def test_login_through_a_gateway_on_the_deployment(
        deployment: Deployment, make_stack: StackFactory,
        browser: aiohttp.ClientSession) -> None:
    stack = await make_stack(session=session_section(deployment))
    resp = await login(browser, stack.gateway, "/echo?deployment=1")
    assert resp.status == 200
    async with browser.get(stack.gateway + "/oauth2/readyz?full") as ready:
        assert (await ready.json())["store"] == "ok"


def test_tls_without_the_ca_is_refused(tmp_path: Path) -> None:
    """The store's certificate is checked: a server we cannot verify is unavailable."""
    reason = missing_binaries()
    if reason:
        pytest.skip(reason)
    import asyncio

    from gateway.errors import StoreUnavailableError

    tls = start_tls(tmp_path)
    try:
        config = config_module.SessionConfig.model_validate({"store": tls.url})

        async def ping() -> None:
            backend = open_backend(config, clock=time.time)
            try:
                await backend.ping()
            finally:
                await backend.aclose()

        with pytest.raises(StoreUnavailableError):
            asyncio.run(ping())
    finally:
        tls.stop()
