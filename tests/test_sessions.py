"""Sessions: the cookie format, and one contract suite run against every backend.

Backends: the embedded memory store (fake clock), fakeredis (fast), and a real redis-server.
Time-dependent checks use the memory backend's injected clock; for Redis they check the TTL
that was set, since Redis expires keys on its own clock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from aiohttp._cookie_helpers import parse_cookie_header
from conftest import FakeClock

from gateway.errors import StoreUnavailableError
from gateway.identity import Identity
from gateway.oidc.token_set import TokenSet
from gateway.sessions import cache as cache_module
from gateway.sessions import cookies
from gateway.sessions.backends import Backend, MemoryBackend, gcra
from gateway.sessions.cookies import SessionCookie
from gateway.sessions.keys import Keys
from gateway.sessions.model import LoginAttempt, Session
from gateway.sessions.redis import RedisBackend
from gateway.sessions.registry import SessionInfo
from gateway.sessions.store import ATTEMPT_TTL, SessionStore

IDLE = 1800.0
MAX = 43200.0
ALICE = Identity("alice", "alice@example.com", True, "alice", ("admins",), "sid-1")
TOKENS = TokenSet("access-token-value-123", "id.token.value-456", "refresh-789", 1e10)
KEYS = Keys.for_deployment("https://idp.example.com", "gateway", None)


def make_store(backend: Backend, clock: Callable[[], float], *, idle: float = IDLE,
               max_lifetime: float = MAX, keys: Keys = KEYS) -> SessionStore:
    return SessionStore(backend, keys, idle_timeout=idle, max_lifetime=max_lifetime,
                        clock=clock)


class CountingBackend:
    """Wraps a backend and counts writes, to prove what the per-request path costs."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in ("set", "expire", "index_add", "delete"):
            return attribute

        async def counted(*args: Any) -> Any:
            self.writes += 1
            return await attribute(*args)

        return counted


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def backend(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryBackend(clock)
        return
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    else:
        client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
        await client.flushdb()  # our own test server (conftest), never a shared one
    yield RedisBackend(client)
    await client.aclose()


@pytest.fixture
def store(backend: Backend, clock: FakeClock) -> SessionStore:
    counted: Any = CountingBackend(backend)
    return make_store(counted, clock)


def counting(store: SessionStore) -> CountingBackend:
    assert isinstance(store.backend, CountingBackend)
    return store.backend


def test_new_cookie_is_two_256_bit_random_halves() -> None:
    cookie = SessionCookie.new()
    assert len(cookie.session_id) == 32 and len(cookie.key) == 32
    head, _, tail = cookie.value.partition(".")
    assert len(head) == 43 and len(tail) == 43
    assert SessionCookie.parse(cookie.value) == cookie
    assert cookie.storage_id == hashlib.sha256(cookie.session_id).hexdigest()
    assert SessionCookie.new() != cookie


@pytest.mark.parametrize("value", [
    None, "", "abc", "a" * 87, "a" * 43 + "." + "b" * 42, "a" * 43 + ".." + "b" * 42,
    "a" * 43 + "." + "b" * 43 + "=", "+" * 43 + "." + "b" * 43, "a" * 43 + "." + "b" * 44,
    "\x00" * 87,
])
def test_malformed_cookies_parse_to_nothing(value: str | None) -> None:
    assert SessionCookie.parse(value) is None


def test_non_canonical_base64_is_refused() -> None:
    """One id, one spelling: base64 with non-zero padding bits is not the same cookie."""
    cookie = SessionCookie.new().value
    last = cookie[-1]
    sibling = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = sibling.index(last)
    twin = cookie[:-1] + sibling[index ^ 1]  # same 6-bit group except the unused low bit
    assert SessionCookie.parse(twin) is None


async def sign_out(store: SessionStore, cookie: SessionCookie) -> None:
    loaded = await store.load(cookie.value)
    assert loaded is not None
    await store.delete(loaded)


async def test_created_session_loads_with_identity_and_tokens(store: SessionStore) -> None:
    cookie = await store.create(ALICE, TOKENS)
    loaded = await store.load(cookie.value)
    assert loaded is not None and loaded.cookie == cookie
    assert loaded.session.identity == ALICE
    assert loaded.session.tokens == TOKENS


@pytest.mark.parametrize("header", [
    "", "gateway_session=A.B", "a=1; gateway_session=A.B; b=2", "gateway_session=A.B;c=3",
    "gateway_session=A.B; gateway_session=C.D", "gateway_session_login=X; other=gateway_session",
    "xgateway_session=A.B", "gateway_session=", "  gateway_session=A.B  ;",
])
def test_the_session_cookie_is_found_as_aiohttp_finds_it(header: str) -> None:
    parsed = dict((name, morsel.value) for name, morsel in parse_cookie_header(header))
    assert cookies.value_in(header, "gateway_session") == parsed.get("gateway_session")


async def test_unknown_and_tampered_cookies_load_nothing(store: SessionStore) -> None:
    cookie = await store.create(ALICE, TOKENS)
    assert await store.load(SessionCookie.new().value) is None
    forged = SessionCookie(cookie.session_id, SessionCookie.new().key)
    assert await store.load(forged.value) is None  # right id, wrong key: never a session
    assert await store.load(None) is None
    assert await store.load("garbage") is None


async def test_store_holds_neither_tokens_nor_cookie_parts(store: SessionStore,
                                                           backend: Backend) -> None:
    """A dump of the store must not yield tokens or usable cookies."""
    cookie = await store.create(ALICE, TOKENS)
    name = KEYS.session(cookie.storage_id)
    raw, _ = await backend.get(name)
    assert raw is not None
    head, _, tail = cookie.value.partition(".")
    for needle in (TOKENS.access_token, TOKENS.id_token, TOKENS.refresh_token or "", "alice"):
        assert needle.encode() not in raw
    for part in (head, tail):
        assert part not in name and part.encode() not in raw


async def test_record_moved_to_another_name_does_not_decrypt(store: SessionStore,
                                                             backend: Backend) -> None:
    cookie = await store.create(ALICE, TOKENS)
    raw, _ = await backend.get(KEYS.session(cookie.storage_id))
    assert raw is not None
    other = SessionCookie(SessionCookie.new().session_id, cookie.key)
    await backend.set(KEYS.session(other.storage_id), raw, 60)
    assert await store.load(other.value) is None


async def test_delete_ends_the_session(store: SessionStore) -> None:
    cookie = await store.create(ALICE, TOKENS)
    await sign_out(store, cookie)
    assert await store.load(cookie.value) is None


async def test_ttl_is_the_idle_timeout(store: SessionStore, backend: Backend) -> None:
    cookie = await store.create(ALICE, TOKENS)
    _, ttl = await backend.get(KEYS.session(cookie.storage_id))
    assert ttl is not None and IDLE - 5 < ttl <= IDLE


async def test_loading_again_soon_writes_nothing(store: SessionStore) -> None:
    """No store write per request: the sliding TTL is only pushed after a touch interval."""
    cookie = await store.create(ALICE, TOKENS)
    writes = counting(store).writes
    for _ in range(5):
        assert await store.load(cookie.value) is not None
    assert counting(store).writes == writes


async def test_idle_session_expires_and_active_one_slides(clock: FakeClock) -> None:
    store = make_store(MemoryBackend(clock), clock)
    idle = await store.create(ALICE, TOKENS)
    active = await store.create(ALICE, TOKENS)
    for _ in range(4):
        clock.advance(IDLE * 0.6)
        assert await store.load(active.value) is not None
    assert await store.load(idle.value) is None


async def test_session_never_outlives_max_lifetime(clock: FakeClock) -> None:
    backend = MemoryBackend(clock)
    store = make_store(backend, clock, max_lifetime=3 * IDLE)
    cookie = await store.create(ALICE, TOKENS)
    for _ in range(5):
        clock.advance(IDLE * 0.5)
        assert await store.load(cookie.value) is not None
    _, ttl = await backend.get(KEYS.session(cookie.storage_id))
    assert ttl is not None and ttl <= IDLE * 0.5 + 1  # capped at what is left of the lifetime
    clock.advance(IDLE * 0.6)
    assert await store.load(cookie.value) is None


async def test_login_attempt_is_single_use_and_sealed(store: SessionStore,
                                                      backend: Backend) -> None:
    attempt = LoginAttempt("nonce-secret-1", "verifier-secret-2", "/app?x=1", "b" * 64)
    await store.save_attempt("state-1", attempt)
    raw, ttl = await backend.get(KEYS.attempt("state-1"))
    assert raw is not None and ttl is not None and ttl <= ATTEMPT_TTL
    assert b"nonce-secret-1" not in raw and b"verifier-secret-2" not in raw
    assert await store.pop_attempt("state-1") == attempt
    assert await store.pop_attempt("state-1") is None
    assert await store.pop_attempt("never-issued") is None


async def test_login_attempt_expires_after_ten_minutes(clock: FakeClock) -> None:
    store = make_store(MemoryBackend(clock), clock)
    await store.save_attempt("s", LoginAttempt("n", "v", "/", "b"))
    clock.advance(ATTEMPT_TTL + 1)
    assert await store.pop_attempt("s") is None


async def test_counter_counts_within_its_window_only(backend: Backend,
                                                     clock: FakeClock) -> None:
    assert [await backend.count("c", 0.3) for _ in range(3)] == [1, 2, 3]
    assert await backend.count("other", 0.3) == 1
    _, ttl = await backend.get("c")
    assert ttl is not None and ttl <= 0.3  # counting again never extends the window
    await asyncio.sleep(0.35)  # Redis's clock
    clock.advance(0.35)  # the memory backend's
    assert await backend.count("c", 0.3) == 1


async def test_memory_backend_sweeps_expired_records(clock: FakeClock) -> None:
    backend = MemoryBackend(clock)
    for i in range(100):
        await backend.set(f"k{i}", b"v", 10)
    clock.advance(120)
    await backend.set("fresh", b"v", 10)
    assert len(backend._data) == 1


async def test_unreachable_redis_is_store_unavailable() -> None:
    """Fail closed: a Redis that is down is an explicit 503, never 'no session'."""
    backend = RedisBackend.from_url("redis://127.0.0.1:1/0", timeout=0.5)
    try:
        calls: list[Callable[[], object]] = [
            lambda: backend.get("k"), lambda: backend.set("k", b"v", 1),
            lambda: backend.pop("k"), lambda: backend.ping(), lambda: backend.count("k", 1),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailableError):
                await call()  # type: ignore[misc]
    finally:
        await backend.aclose()


BOB = Identity("bob", "Bob@Example.com", True, "bob", (), "sid-2")


async def test_registry_finds_sessions_by_sub_email_and_sid(store: SessionStore) -> None:
    first = await store.create(ALICE, TOKENS)
    second = await store.create(ALICE, TOKENS)
    bob = await store.create(BOB, TOKENS)
    registry = store.registry
    alice_ids = {first.storage_id, second.storage_id}
    assert {i.storage_id for i in await registry.by_user("alice")} == alice_ids
    assert {i.storage_id for i in await registry.by_user("ALICE@example.com")} == alice_ids
    assert [i.storage_id for i in await registry.by_user("bob@example.com")] == [bob.storage_id]
    assert [i.storage_id for i in await registry.by_sid("sid-2")] == [bob.storage_id]
    assert {i.storage_id for i in await registry.all()} == alice_ids | {bob.storage_id}


async def test_a_tag_shared_in_a_bucket_never_shows_one_user_anothers_sessions(
        store: SessionStore, backend: Backend) -> None:
    """Index members are found by a 64-bit tag in a shared bucket: a member of bob's session
    under alice's tag (a collision, made here on purpose) is checked against bob's entry
    and left out of alice's lookups, and neither listed nor revoked with hers."""
    alice = await store.create(ALICE, TOKENS)
    bob = await store.create(BOB, TOKENS)
    for kind, value in (("sub", "alice"), ("sid", "sid-1"), ("email", "alice@example.com")):
        bucket, tag = KEYS.index(kind, value)
        await backend.index_add([(bucket, KEYS.index_member(tag, bob.storage_id))], IDLE)
    registry = store.registry
    assert [i.storage_id for i in await registry.by_user("alice")] == [alice.storage_id]
    assert [i.storage_id for i in await registry.by_user("alice@example.com")] == [
        alice.storage_id]
    assert await registry.revoke(await registry.by_sid("sid-1")) == 1
    assert await store.load(bob.value) is not None
    assert await store.load(alice.value) is None


async def test_sessions_indexed_by_the_earlier_release_are_found_and_cleaned(
        store: SessionStore, backend: Backend, clock: FakeClock) -> None:
    """A session its replicas indexed (a sorted set per value, before the buckets) is found
    by sub, email and sid, and its members go with it; with write_legacy_indexes on, a new
    session is indexed both ways (so those replicas, during a rolling upgrade, find it)."""
    cookie = await store.create(ALICE, TOKENS)
    legacy = [KEYS.legacy_index(kind, value) for kind, value in
              (("sub", "alice"), ("email", "alice@example.com"), ("sid", "sid-1"))]
    buckets = [KEYS.index(kind, value)[0] for kind, value in
               (("sub", "alice"), ("email", "alice@example.com"), ("sid", "sid-1"))]
    def named(value: str) -> str:  # the earlier release's hash of the value
        return hashlib.sha256(f"https://idp.example.com\ngateway\n{value}".encode()).hexdigest()

    assert legacy == [f"{KEYS.prefix}:sub:{{{named('alice')}}}",
                      f"{KEYS.prefix}:email:{{{named('alice@example.com')}}}",
                      f"{KEYS.prefix}:sid:{{{named('sid-1')}}}"]
    await backend.delete(*buckets)  # as its replicas left it: only the earlier indexes
    await backend.index_add([(key, cookie.storage_id) for key in legacy], IDLE)
    registry = store.registry
    assert [i.storage_id for i in await registry.by_user("alice@example.com")] == [
        cookie.storage_id]
    assert [i.storage_id for i in await registry.by_sid("sid-1")] == [cookie.storage_id]
    assert await registry.revoke(await registry.by_sub("alice")) == 1
    assert await backend.index_members([(key, "") for key in legacy]) == [set(), set(), set()]
    both = SessionStore(backend, KEYS, idle_timeout=IDLE, max_lifetime=MAX, clock=clock,
                        write_legacy_indexes=True)
    second = await both.create(ALICE, TOKENS)
    assert await backend.index_members([(key, "") for key in legacy]) == [
        {second.storage_id}] * 3
    tagged = await backend.index_members(
        [KEYS.index(kind, value) for kind, value in
         (("sub", "alice"), ("email", "alice@example.com"), ("sid", "sid-1"))])
    assert [{KEYS.storage_id_in(m) for m in members} for members in tagged] == [
        {second.storage_id}] * 3


async def test_index_members_share_bucket_keys(backend: Backend, clock: FakeClock) -> None:
    """The point of the buckets: a user's three indexes are not three keys of their own
    (each cost Redis about 300 bytes): 600 users' 1,800 index members share fewer keys,
    none of them more than 64 bytes long (Redis keeps a small sorted set of such compact)."""
    store = make_store(backend, clock)
    for n in range(600):
        await store.create(Identity(f"user-{n}", f"user-{n}@example.com", True,
                                    sid=f"sid-{n}"), TOKENS)
    buckets = {KEYS.index(kind, value)[0] for n in range(600) for kind, value in
               (("sub", f"user-{n}"), ("email", f"user-{n}@example.com"), ("sid", f"sid-{n}"))}
    assert len(buckets) < 1800 - 250  # 4,096 buckets: many of the 1,800 fall together
    member = KEYS.index_member(KEYS.index("sub", "user-1")[1], "ab" * 32)
    assert len(member) == 54 and KEYS.storage_id_in(member) == "ab" * 32
    index_keys = [k for k in await backend.keys(KEYS.prefix + ":index:")] \
        if not isinstance(backend, MemoryBackend) else list(backend._sets)
    assert set(index_keys) == buckets


async def test_revoking_by_user_needs_no_session_key(store: SessionStore) -> None:
    """Admin revocation works from the store alone: no cookie, no decryption."""
    alice = await store.create(ALICE, TOKENS)
    bob = await store.create(BOB, TOKENS)
    registry = store.registry
    assert await registry.revoke(await registry.by_user("alice")) == 1
    assert await store.load(alice.value) is None
    assert await store.load(bob.value) is not None
    assert await registry.by_user("alice") == []  # dangling index entries are dropped


async def test_registry_entries_hold_no_tokens(store: SessionStore, backend: Backend) -> None:
    cookie = await store.create(ALICE, TOKENS)
    raw, _ = await backend.get(KEYS.entry(cookie.storage_id))
    assert raw is not None
    for needle in (TOKENS.access_token, TOKENS.id_token, *cookie.value.split(".")):
        assert needle.encode() not in raw


def test_a_registry_entry_is_compact_and_reads_back_the_same() -> None:
    info = SessionInfo("ab" * 32, "alice", "alice@example.com", "sid-1", 1_700_000_000.5,
                       1_700_000_060.25, 1_700_086_400.5, "192.0.2.1", "Firefox", True,
                       "0123456789abcdef")
    raw = info.to_bytes()
    assert info.storage_id.encode() not in raw and b"user_agent" not in raw  # the key has it
    assert SessionInfo.from_bytes(info.storage_id, raw) == info
    earlier = json.dumps(dataclasses.asdict(info)).encode()  # a JSON object, every field named
    assert SessionInfo.from_bytes(info.storage_id, earlier) == info
    assert len(raw) < len(earlier) * 0.7


async def test_entries_of_the_previous_release_are_found_listed_and_revoked(
        store: SessionStore, backend: Backend) -> None:
    """A session of the release before (its entry in format 1, under the old name), as the
    store holds it after an upgrade: found by user and sid, listed, and its entry deleted
    with it."""
    cookie = await store.create(ALICE, TOKENS)
    storage_id = cookie.storage_id
    info = await store.registry.get(storage_id)
    assert info is not None
    await backend.delete(KEYS.entry(storage_id))
    await backend.set(KEYS.legacy_entry(storage_id),
                      json.dumps(dataclasses.asdict(info)).encode(), IDLE)
    assert await store.registry.get(storage_id) == info
    assert await store.registry.by_user("alice") == [info]
    assert await store.registry.by_sid("sid-1") == [info]
    assert await store.registry.all() == [info]
    await sign_out(store, cookie)
    assert (await backend.get(KEYS.legacy_entry(storage_id)))[0] is None
    assert await store.registry.all() == []


async def test_a_replica_of_the_previous_release_still_revokes_new_sessions(
        store: SessionStore, backend: Backend) -> None:
    """During a rolling upgrade, a replica of the release before looks for entries under
    the old name only, and could not read the new format there. It finds none for a new
    session, and goes by the record itself, as for an entry lost to eviction (which
    test_a_session_whose_registry_entry_was_lost_can_still_be_revoked shows), so its
    revocations still reach the session."""
    cookie = await store.create(ALICE, TOKENS)
    assert (await backend.get(KEYS.legacy_entry(cookie.storage_id)))[0] is None
    assert (await backend.get(KEYS.entry(cookie.storage_id)))[0] is not None


async def test_signing_out_removes_the_registry_entry(store: SessionStore) -> None:
    cookie = await store.create(ALICE, TOKENS)
    await sign_out(store, cookie)
    assert await store.registry.all() == []


async def test_session_past_max_lifetime_leaves_no_registry_entry(clock: FakeClock) -> None:
    """The store's own TTL may run on another clock (Redis): lifetime is checked on load too."""
    backend = MemoryBackend(clock)
    store = make_store(backend, clock, max_lifetime=2 * IDLE)
    cookie = await store.create(ALICE, TOKENS)
    for key in (KEYS.session(cookie.storage_id), KEYS.entry(cookie.storage_id)):
        await backend.expire(key, 10 * IDLE)  # as if the store's clock lagged behind ours
    clock.advance(2 * IDLE + 1)
    assert await store.load(cookie.value) is None
    assert await store.registry.all() == []


async def test_replace_writes_only_while_the_key_exists(backend: Backend) -> None:
    """SET XX: what keeps a revoked session revoked, on every backend."""
    assert await backend.replace("k", b"new", 10) is False
    assert (await backend.get("k"))[0] is None
    await backend.set("k", b"old", 10)
    assert await backend.replace("k", b"new", 20) is True
    value, ttl = await backend.get("k")
    assert value == b"new" and ttl is not None and 10 < ttl <= 20


async def test_new_tokens_for_a_deleted_session_are_not_written(store: SessionStore) -> None:
    """The refresh race: a revocation lands between the load and the write of new tokens."""
    cookie = await store.create(ALICE, TOKENS)
    loaded = await store.load(cookie.value)
    assert loaded is not None
    await store.delete(loaded)
    refreshed = dataclasses.replace(loaded.session,
                                    tokens=dataclasses.replace(TOKENS, access_token="n"))
    assert await store.replace(loaded, refreshed) is None
    assert await store.load(cookie.value) is None
    assert await store.registry.get(cookie.storage_id) is None


async def test_replace_updates_the_registry_when_the_identity_changed(store: SessionStore) -> None:
    cookie = await store.create(ALICE, TOKENS)
    loaded = await store.load(cookie.value)
    assert loaded is not None
    moved = dataclasses.replace(ALICE, email="alice@new.example.com")
    stored = await store.replace(loaded, dataclasses.replace(loaded.session, identity=moved))
    assert stored is not None and stored.session.identity == moved
    found = await store.registry.by_user("alice@new.example.com")
    assert [info.storage_id for info in found] == [cookie.storage_id]
    assert found[0].email == "alice@new.example.com"


async def test_a_touch_never_brings_back_a_revoked_registry_entry(clock: FakeClock) -> None:
    backend = MemoryBackend(clock)
    store = make_store(backend, clock)
    cookie = await store.create(ALICE, TOKENS)
    info = await store.registry.get(cookie.storage_id)
    assert info is not None
    await store.registry.revoke([info])
    await store.registry.touch(info, IDLE)  # a load that read the record just before
    assert await store.registry.all() == []


async def test_another_deployment_on_the_same_store_loads_nothing(backend: Backend,
                                                                 clock: FakeClock) -> None:
    """Sidecars of different apps sharing one Redis: even with one key_prefix by mistake, a
    record sealed for one client (or one issuer) never opens for another."""
    app_a = make_store(backend, clock, keys=Keys("shared", "https://idp.example.com", "app-a"))
    cookie = await app_a.create(ALICE, TOKENS)
    assert await app_a.load(cookie.value) is not None
    for keys in (Keys("shared", "https://idp.example.com", "app-b"),
                 Keys("shared", "https://other-idp.example.com", "app-a")):
        other = make_store(backend, clock, keys=keys)
        assert await other.load(cookie.value) is None
        assert await other.registry.by_sub("alice") == []  # one IdP's alice is not another's
        assert await other.registry.by_user("alice@example.com") == []


def test_every_deployment_gets_its_own_namespace_by_default() -> None:
    names = {Keys.for_deployment(issuer, client, None).session("h")
             for issuer in ("https://a.example", "https://b.example") for client in ("x", "y")}
    assert len(names) == 4
    assert Keys.for_deployment("https://a.example", "x", "billing").session("h") == \
        "billing:session:{h}"


async def test_set_beside_writes_only_while_the_anchor_exists(backend: Backend) -> None:
    assert await backend.set_beside("{t}meta", b"m", 10, anchor="{t}session") is False
    assert (await backend.get("{t}meta"))[0] is None
    await backend.set("{t}session", b"s", 10)
    assert await backend.set_beside("{t}meta", b"m", 10, anchor="{t}session") is True
    assert (await backend.get("{t}meta"))[0] == b"m"


async def test_a_session_whose_registry_entry_was_lost_can_still_be_revoked(
        backend: Backend, clock: FakeClock) -> None:
    """An evicted entry used to make its session unrevocable by user or sid for good: the
    lookups dropped the index member, and a touch no longer recreated the entry."""
    store = make_store(backend, clock)
    cookie = await store.create(ALICE, TOKENS)
    await backend.delete(KEYS.entry(cookie.storage_id))  # evicted, say
    found = await store.registry.by_user("alice")
    assert [info.storage_id for info in found] == [cookie.storage_id]
    assert [i.storage_id for i in await store.registry.by_sid("sid-1")] == [cookie.storage_id]
    clock.advance(120)
    await backend.expire(KEYS.session(cookie.storage_id), IDLE - 120)  # Redis's own clock
    assert await store.load(cookie.value) is not None  # the touch restores the entry
    assert await store.registry.get(cookie.storage_id) is not None
    assert await store.registry.revoke(await store.registry.by_user("alice")) == 1
    assert await store.load(cookie.value) is None


async def test_delete_if_releases_only_a_lock_we_still_own(backend: Backend) -> None:
    assert await backend.add_once("{l}lock", 10, b"me")
    assert not await backend.add_once("{l}lock", 10, b"other")
    await backend.delete_if("{l}lock", b"other")  # a late holder whose lock expired
    assert (await backend.get("{l}lock"))[0] == b"me"
    await backend.delete_if("{l}lock", b"me")
    assert (await backend.get("{l}lock"))[0] is None


async def test_revoke_all_reaches_a_session_whose_entry_was_evicted(
        backend: Backend, clock: FakeClock) -> None:
    store = make_store(backend, clock)
    cookie = await store.create(dataclasses.replace(ALICE, sub="carol"), TOKENS)
    await backend.delete(KEYS.entry(cookie.storage_id))
    await store.registry.revoke(await store.registry.all())
    assert await store.load(cookie.value) is None


async def test_a_touch_restores_lost_indexes(backend: Backend, clock: FakeClock) -> None:
    """An evicted sid index left back-channel logout blind until the next refresh."""
    store = make_store(backend, clock)
    cookie = await store.create(ALICE, TOKENS)
    await backend.delete(KEYS.index("sid", "sid-1")[0], KEYS.index("sub", "alice")[0])
    assert await store.registry.by_sid("sid-1") == []
    clock.advance(120)
    await backend.expire(KEYS.session(cookie.storage_id), IDLE - 120)  # Redis's own clock
    assert await store.load(cookie.value) is not None  # the touch
    assert [i.storage_id for i in await store.registry.by_sid("sid-1")] == [cookie.storage_id]
    assert [i.storage_id for i in await store.registry.by_sub("alice")] == [cookie.storage_id]


async def test_a_namespace_shared_by_mistake_keeps_listings_apart(
        backend: Backend, clock: FakeClock) -> None:
    """Cookies never crossed (AEAD); now `sessions list` and `revoke --all` don't either."""
    app_a = make_store(backend, clock, keys=Keys("shared", "https://idp.example.com", "app-a"))
    app_b = make_store(backend, clock, keys=Keys("shared", "https://idp.example.com", "app-b"))
    cookie = await app_a.create(ALICE, TOKENS)
    assert await app_b.registry.all() == []
    await app_b.registry.revoke(await app_b.registry.all())
    assert await app_a.load(cookie.value) is not None


@pytest.mark.parametrize("email", ["Mallory@Example.com", "\u212aim@example.com"])
async def test_only_verified_emails_are_found_by_email(store: SessionStore, email: str) -> None:
    """`revoke --user ceo@corp.com` must not reach whoever merely claimed that address."""
    claimed = await store.create(Identity("mallory", email, False), TOKENS)
    verified = await store.create(Identity("kim", "KIM@example.com", True), TOKENS)
    assert await store.registry.by_user(email) == []
    assert [i.storage_id for i in await store.registry.by_user("kim@EXAMPLE.com")] == [
        verified.storage_id]
    assert await store.registry.by_user("kim@example.com") != await store.registry.by_user(
        "\u212aim@example.com")
    assert claimed


async def test_a_store_that_evicts_keys_is_warned_about_at_start(
        redis_url: str, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    client = aioredis.Redis.from_url(redis_url)  # our own test server (conftest)
    store = make_store(RedisBackend(client), clock)
    try:
        await store.warn_if_evicting()
        assert "store_evicts_keys" not in caplog.text
        await client.config_set("maxmemory-policy", "volatile-lru")
        await store.warn_if_evicting()
        assert "store_evicts_keys policy=volatile-lru" in caplog.text
    finally:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()


async def footprint(backend: Backend) -> tuple[int, int]:
    """How many keys under our namespace, and how many index members, the store holds."""
    keys = await backend.keys(KEYS.prefix + ":")
    if isinstance(backend, MemoryBackend):
        members = sum(len(backend._live_set(key)) for key in list(backend._sets))
        return len(keys) + len(backend._sets), members
    assert isinstance(backend, RedisBackend)
    client = backend._client
    members = sum([await client.zcard(key) for key in keys
                   if await client.type(key) in (b"zset", "zset")])
    return len(keys), members


@pytest.mark.parametrize("logins", [1, 30])
async def test_the_store_does_not_grow_with_logins_and_sign_outs(
        backend: Backend, clock: FakeClock, logins: int) -> None:
    """Seen in a soak: 30 logins with sign-outs took the store from 3 keys and 3 index members
    to 35 and 93, and a user logging in twice a day kept dead members forever."""
    store = make_store(backend, clock)
    before = await footprint(backend)
    for n in range(logins):
        identity = Identity("alice", "alice@example.com", True, "alice", ("staff",), f"sid-{n}")
        cookie = await store.create(identity, TOKENS)
        assert await store.load(cookie.value) is not None
        if n % 3 == 2:  # revoked by an admin, or a back-channel logout
            await store.registry.revoke(await store.registry.by_sid(f"sid-{n}"))
        else:
            await sign_out(store, cookie)
    assert await footprint(backend) == before


async def test_index_members_end_with_their_sessions_idle_time(clock: FakeClock) -> None:
    """A session that simply goes idle leaves nothing behind in the indexes either."""
    backend = MemoryBackend(clock)
    store = make_store(backend, clock)
    cookies = [await store.create(ALICE, TOKENS) for _ in range(5)]
    assert len(await store.registry.by_user("alice")) == 5
    clock.advance(IDLE + 1)
    await store.create(dataclasses.replace(ALICE, sub="bob", sid="sid-2",
                                           email="bob@example.com"), TOKENS)
    assert await footprint(backend) == (2 + 3, 3)  # bob's record and entry, his 3 indexes
    assert all([await store.load(c.value) is None for c in cookies])


async def test_walking_an_index_takes_two_round_trips_whatever_its_size(
        store: SessionStore) -> None:
    """sessions list --user took 788 ms on a 444-member set: one GET per member."""
    for _ in range(40):
        await store.create(ALICE, TOKENS)
    calls: list[str] = []
    backend = counting(store).inner
    for name in ("get", "get_many", "index_members"):
        original = getattr(backend, name)

        async def counted(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return await _original(*args)

        setattr(backend, name, counted)
    assert len(await store.registry.by_sub("alice")) == 40
    assert calls == ["index_members", "get_many"]


async def test_a_new_session_is_written_in_one_round_trip(
        redis_url: str, clock: FakeClock) -> None:
    """A sign-in wrote its record, its entry and its indexes in three round trips; now one
    pipeline carries them all (on a real Redis: one request, every command in it)."""
    client = aioredis.Redis.from_url(redis_url)
    backend = RedisBackend(client)
    keys = Keys(f"one-trip-{os.urandom(4).hex()}", "https://idp.example.com", "gateway")
    store = make_store(backend, clock, keys=keys)  # a namespace of its own: the server is shared
    sent: list[int] = []
    original = client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = original(*args, **kwargs)
        execute = pipe.execute

        async def counted(*a: Any, **k: Any) -> Any:
            sent.append(len(pipe.command_stack))
            return await execute(*a, **k)

        pipe.execute = counted
        return pipe

    client.pipeline = pipeline  # type: ignore[method-assign]
    other_calls: list[str] = []
    for name in ("set", "get", "index_add", "expire", "delete"):
        original_call = getattr(backend, name)

        async def recorded(*a: Any, _name: str = name, _call: Any = original_call) -> Any:
            other_calls.append(_name)
            return await _call(*a)

        setattr(backend, name, recorded)
    try:
        cookie = await store.create(ALICE, TOKENS)
        assert other_calls == [] and sent == [2 + 3 * 4], (other_calls, sent)
        assert await store.load(cookie.value) is not None
        assert [i.storage_id for i in await store.registry.by_sid("sid-1")] == [
            cookie.storage_id]
    finally:
        await client.aclose()


async def test_rate_lets_a_burst_of_the_limit_through_then_refuses(backend: Backend) -> None:
    """GCRA, one atomic step on every backend: `limit` at once, then one per period/limit."""
    decisions = [await backend.rate("r", 5, 60.0) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    refused = decisions[-1]
    assert 0 < refused.retry_after <= 12.0  # the next one, a fifth of the minute on
    assert 48.0 < refused.reset <= 60.0  # the whole quota back
    assert (await backend.rate("another", 5, 60.0)).allowed  # buckets are separate


def test_gcra_refills_evenly(clock: FakeClock) -> None:
    tat = None
    for _ in range(5):
        decision, tat = gcra(tat, clock.now, 5, 60.0)
        assert decision.allowed
    decision, same = gcra(tat, clock.now, 5, 60.0)
    assert not decision.allowed and same == tat and decision.retry_after == pytest.approx(12)
    clock.advance(12)
    decision, tat = gcra(tat, clock.now, 5, 60.0)
    assert decision.allowed and decision.remaining == 0
    clock.advance(60)
    decision, tat = gcra(tat, clock.now, 5, 60.0)
    assert decision.allowed and decision.remaining == 4  # full again, and no more than full


# --- The recently-loaded cache (session.cache_ttl), kept true by invalidations ---


class CountingReads(CountingBackend):
    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        attribute = super().__getattr__(name)
        if name != "get":
            return attribute

        async def counted(*args: Any) -> Any:
            self.reads += 1
            return await attribute(*args)

        return counted


@contextlib.asynccontextmanager
async def following(*stores: SessionStore) -> AsyncIterator[None]:
    """The stores listen to their invalidation channel (as the app's task does)."""
    tasks = [asyncio.create_task(store.follow_invalidations()) for store in stores]
    try:
        for _ in range(200):
            if all(store.recent.on for store in stores):
                break
            await asyncio.sleep(0.01)
        assert all(store.recent.on for store in stores)
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def delivered() -> None:
    """Let an in-process invalidation reach its listeners."""
    for _ in range(5):
        await asyncio.sleep(0)


def cached_store(backend: Backend, clock: Callable[[], float],
                 ttl: float = 1.0) -> SessionStore:
    return SessionStore(backend, KEYS, idle_timeout=IDLE, max_lifetime=MAX, clock=clock,
                        cache_ttl=ttl)


async def test_a_recently_loaded_session_costs_no_store_round_trip(clock: FakeClock) -> None:
    backend: Any = CountingReads(MemoryBackend(clock))
    store = cached_store(backend, clock)
    cookie = await store.create(ALICE, TOKENS)
    async with following(store):
        for _ in range(5):
            loaded = await store.load(cookie.value)
            assert loaded is not None and loaded.session.identity == ALICE
        assert backend.reads == 1
        clock.advance(1.0)  # as old as cache_ttl: read again
        assert await store.load(cookie.value) is not None
        assert backend.reads == 2


async def test_without_the_invalidation_channel_nothing_is_cached(clock: FakeClock) -> None:
    backend: Any = CountingReads(MemoryBackend(clock))
    store = cached_store(backend, clock)
    cookie = await store.create(ALICE, TOKENS)
    for _ in range(3):  # not listening (yet): every load asks the store
        assert await store.load(cookie.value) is not None
    assert backend.reads == 3
    async with following(store):
        assert await store.load(cookie.value) is not None
        assert await store.load(cookie.value) is not None
        assert backend.reads == 4
    assert not store.recent.on  # listening stopped: the cache is off and empty again
    assert await store.load(cookie.value) is not None
    assert backend.reads == 5


async def test_the_cache_answers_only_the_exact_cookie(clock: FakeClock) -> None:
    """An entry holds a hash of the whole cookie: the right id with another key is no
    session, cached or not."""
    store = cached_store(MemoryBackend(clock), clock)
    cookie = await store.create(ALICE, TOKENS)
    async with following(store):
        assert await store.load(cookie.value) is not None
        forged = SessionCookie(cookie.session_id, bytes(32))
        assert await store.load(forged.value) is None
        assert await store.load(cookie.value) is not None


async def test_this_process_sees_its_own_deletes_and_replaces_at_once(clock: FakeClock) -> None:
    store = cached_store(MemoryBackend(clock), clock)
    cookie = await store.create(ALICE, TOKENS)
    async with following(store):
        loaded = await store.load(cookie.value)
        assert loaded is not None
        newer = TokenSet("access-2", "id.token.2", "refresh-2", 2e10)
        replaced = await store.replace(loaded, dataclasses.replace(loaded.session,
                                                                   tokens=newer))
        assert replaced is not None
        again = await store.load(cookie.value)
        assert again is not None and again.session.tokens == newer
        await store.delete(again)
        assert await store.load(cookie.value) is None


async def test_another_processes_revocation_and_refresh_land_at_once(clock: FakeClock) -> None:
    backend = MemoryBackend(clock)
    here, there = cached_store(backend, clock, ttl=10.0), cached_store(backend, clock)
    cookie = await here.create(ALICE, TOKENS)
    async with following(here, there):
        assert await here.load(cookie.value) is not None
        loaded_there = await there.load(cookie.value)
        assert loaded_there is not None
        newer = TokenSet("access-2", "id.token.2", "refresh-2", 2e10)
        loaded_there = await there.replace(loaded_there, dataclasses.replace(
            loaded_there.session, tokens=newer))
        assert loaded_there is not None
        await delivered()
        seen = await here.load(cookie.value)
        assert seen is not None and seen.session.tokens == newer  # not the cached copy
        await there.registry.revoke([SessionInfo.bare(cookie.storage_id)])  # e.g. the admin CLI
        await delivered()
        assert await here.load(cookie.value) is None  # well within cache_ttl


class SlowReads:
    """A backend whose reads wait for `release`: a load in flight while something happens."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str) -> tuple[bytes | None, float | None]:
        found = await self.inner.get(key)
        await self.release.wait()
        return found


async def test_a_load_under_way_when_its_session_is_revoked_is_not_cached(
        clock: FakeClock) -> None:
    backend: Any = SlowReads(MemoryBackend(clock))
    here, there = cached_store(backend, clock), make_store(backend.inner, clock)
    cookie = await here.create(ALICE, TOKENS)
    async with following(here):
        load = asyncio.create_task(here.load(cookie.value))  # reads the record, then waits
        await delivered()
        await there.registry.revoke([SessionInfo.bare(cookie.storage_id)])
        await delivered()
        backend.release.set()
        assert await load is not None  # it read the record before the revocation
        assert await here.load(cookie.value) is None  # but did not keep it


async def test_the_cache_is_bounded(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "ENTRIES", 2)
    backend: Any = CountingReads(MemoryBackend(clock))
    store = cached_store(backend, clock)
    cookies = [await store.create(ALICE, TOKENS) for _ in range(3)]
    async with following(store):
        for cookie in cookies:
            await store.load(cookie.value)
        await store.load(cookies[0].value)  # evicted by the third: read again
        assert backend.reads == 4
        assert await store.load(cookies[2].value) is not None  # still cached
        assert backend.reads == 4
        await store.delete((await store.load(cookies[2].value)) or pytest.fail("cached"))
        assert await store.load(cookies[2].value) is None
        assert await store.load(cookies[0].value) is not None
        assert backend.reads == 5  # the deleted one's read; cookies[0] still cached


async def test_on_redis_a_revocation_reaches_every_store_and_a_lost_channel_turns_the_cache_off(
        redis_url: str, clock: FakeClock) -> None:
    """Real pub/sub: two stores (two replicas) on one Redis. A revocation by one drops the
    other's copy at once; when the other's pub/sub connection is killed, it reads the store
    until it has listened again, and its cache is empty when it comes back."""
    keys = Keys("gateway:test-cache", "https://idp.example", "client")
    backends = [RedisBackend.from_url(redis_url, timeout=2.0) for _ in range(2)]
    counting: Any = CountingReads(backends[0])
    here = SessionStore(counting, keys, idle_timeout=IDLE, max_lifetime=MAX, clock=clock,
                        cache_ttl=10.0)
    there = SessionStore(backends[1], keys, idle_timeout=IDLE, max_lifetime=MAX, clock=clock)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        cookie = await there.create(ALICE, TOKENS)
        async with following(here):
            assert await here.load(cookie.value) is not None
            assert await here.load(cookie.value) is not None
            assert counting.reads == 1
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            for _ in range(200):  # noticed: the cache is off until it listens again
                if not here.recent.on:
                    break
                await asyncio.sleep(0.01)
            assert not here.recent.on
            assert await here.load(cookie.value) is not None
            assert counting.reads == 2
            for _ in range(300):
                if here.recent.on:
                    break
                await asyncio.sleep(0.01)
            assert here.recent.on  # back, and empty: the next load reads the store
            assert await here.load(cookie.value) is not None
            assert counting.reads == 3
            loaded = await there.load(cookie.value)
            assert loaded is not None
            started = time.monotonic()
            await there.delete(loaded)
            while await here.load(cookie.value) is not None:
                assert time.monotonic() - started < 0.5
                await asyncio.sleep(0.005)
    finally:
        await admin.aclose()
        for backend in backends:
            await backend.aclose()


def _session(**claims: Any) -> Session:
    token = "eyJhbGciOiJSUzI1NiJ9." + "eyJzdWIiOiJhbGljZSJ9" * 20 + ".c2lnbmF0dXJl" * 20
    identity = Identity("alice", "alice@example.com", True, "alice", ("staff",), "sid-1",
                        {"sub": "alice", "auth_time": 1_700_000_000, **claims})
    return Session(identity, TokenSet(token, token, "refresh", 1_700_003_600.0,
                                      1_700_000_000.0), 1_700_000_000.0, "192.0.2.1", "Firefox")


def test_a_session_record_is_compressed_and_reads_back_the_same() -> None:
    session = _session()
    raw = session.to_bytes()
    assert raw[:1] == b"\x03"
    assert len(raw) < len(zlib.decompress(raw[1:])) * 0.7  # what is inside is far larger
    assert Session.from_bytes(raw) == session


def _json_record(session: Session, version: int) -> bytes:
    """The record as the two previous releases wrote it: the tokens as text in the JSON."""
    data = {"v": version, "identity": session.identity.to_dict(),
            "tokens": session.tokens.to_dict(), "created_at": session.created_at,
            "client_ip": session.client_ip, "user_agent": session.user_agent}
    plain = json.dumps(data, separators=(",", ":")).encode()
    return plain if version == 1 else b"\x02" + zlib.compress(plain)


@pytest.mark.parametrize("version", [1, 2])
def test_a_record_of_an_earlier_release_is_still_read(version: int) -> None:
    session = _session()
    assert Session.from_bytes(_json_record(session, version)) == session


def _jwt(claims: dict[str, Any]) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return ".".join([b64(b'{"alg":"RS256","kid":"k1","typ":"JWT"}'),
                     b64(json.dumps(claims).encode()), b64(os.urandom(256))])


def test_jwt_tokens_are_stored_as_their_bytes_and_come_back_exactly() -> None:
    claims = {"iss": "https://idp.example", "sub": "alice", "aud": "gateway",
              "exp": 1_700_000_300, "iat": 1_700_000_000, "auth_time": 1_700_000_000,
              "acr": "urn:example:pwd", "amr": ["pwd"], "sid": "sGnM2BQ3JrM4A8cqAe0mZg",
              "at_hash": "8O5CkEy6iaBXi7hmOvzL6w", "email": "alice@example.com",
              "email_verified": True, "name": "Alice Admin", "preferred_username": "alice",
              "nonce": "v4L1-rWCCddpaYJZ3UU4YNkwOWOcBcnftoTWC1j88WI",
              "groups": ["staff", "admins"]}  # the demo IdP's ID token
    identity = Identity("alice", "alice@example.com", True, "alice", ("staff", "admins"),
                        "sGnM2BQ3JrM4A8cqAe0mZg", claims)
    tokens = TokenSet("opaque-access-token", _jwt(claims), _jwt({"typ": "Refresh"}),
                      1_700_003_600.0, 1_700_000_000.0)
    session = Session(identity, tokens, 1_700_000_000.0, "192.0.2.1", "Firefox")
    raw = session.to_bytes()
    assert Session.from_bytes(raw) == session
    inside = zlib.decompress(raw[1:])
    assert json.dumps(claims).encode() in inside  # the ID token's payload, beside the claims
    assert tokens.id_token.split(".")[1].encode() not in inside  # and not as base64
    # zlib stores that repeat of the claims in a few bytes; base64 it could barely shrink
    assert len(raw) < len(_json_record(session, 2)) - 150


@pytest.mark.parametrize("token", [
    "opaque-token", "", "a.b", "eyJhIjoxfQ==.eyJhIjoxfQ", "AB.AA", "eyJhIjoxfQ.+/+/",
    "a..b", ".", "eyJhIjoxfQ.eyJhIjoxfQ.", "x" * 5000, "Zm9v.YmFy\n.YQ",
])
def test_every_token_reads_back_byte_for_byte(token: str) -> None:
    """Text that is not canonical base64url segments is kept as text; what is packed
    unpacks to the same string."""
    session = dataclasses.replace(_session(), tokens=TokenSet(token, token, token, None, None))
    assert Session.from_bytes(session.to_bytes()).tokens == session.tokens


@pytest.mark.parametrize("raw", [
    b"\x02" + zlib.compress(json.dumps({"v": 1}).encode()),  # a marker with the wrong version
    b"\x02" + zlib.compress(b"{}")[:-3],  # truncated
    b"\x02not zlib",
    b"\x02" + zlib.compress(b" " * (2 << 20)),  # inflates past any real record
    json.dumps({"v": 2}).encode(),  # version 2 always comes compressed
    b"\x03" + zlib.compress(json.dumps({"v": 2}).encode()),  # a version 2 body, marked 3
    b"\x03" + zlib.compress(json.dumps({  # names token bytes it does not hold
        "v": 3, "identity": {"sub": "a"}, "created_at": 1.0,
        "tokens": {"access_token": [0, 1], "id_token": "x"}}).encode() + b"\n\0\0\0\1a"),
    b"\x03" + zlib.compress(json.dumps({  # token bytes cut short
        "v": 3, "identity": {"sub": "a"}, "created_at": 1.0,
        "tokens": {"access_token": [0], "id_token": "x"}}).encode() + b"\n\0\0\0\x09a"),
])
def test_a_record_that_is_not_exactly_readable_is_refused(raw: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        Session.from_bytes(raw)
