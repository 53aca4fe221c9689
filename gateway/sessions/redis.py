"""RedisBackend on redis.asyncio: one pooled client, a timeout on every call, fail closed.

Every call goes through `_op`: there every redis/socket failure becomes StoreUnavailableError
(and nowhere else), which the error middleware turns into a 503, so a store that is down
never lets a request through unchecked; and there each call is timed for the metrics.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.config import RedisTLSConfig
from gateway.errors import StoreUnavailableError
from gateway.sessions.backends import Observer, Rate
from gateway.store_url import StoreLocation, parse_store_url

log = logging.getLogger("gateway.store")
DEFAULT_TLS = RedisTLSConfig()

# A record and its remaining time (ms) in one command: one round trip per signed-in request,
# and cheaper for the client than a pipeline of GET and PTTL (about half the time here).
_GET_WITH_TTL = """
local value = redis.call('GET', KEYS[1])
if not value then return false end
return {value, redis.call('PTTL', KEYS[1])}
"""


# Compare-and-delete in one step, so a lock that expired and was taken by another replica is
# never released by the late holder. One key: safe on a Cluster.
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# Set a key only while another exists, atomically. Both keys carry the same hash tag, so this
# is safe on a Cluster.
_SET_BESIDE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


# backends.gcra on the server's clock (one clock for every replica), in microseconds; the
# bucket holds its theoretical arrival time and lives until it would be full again.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local interval = tonumber(ARGV[2]) / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * limit
if now < allow_at then
  return {0, 0, tostring(allow_at - now), tostring(tat - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((now - allow_at) / interval), '0', tostring(new_tat - now)}
"""


def _tls_options(tls: RedisTLSConfig) -> dict[str, Any]:
    options: dict[str, Any] = {"ssl_ca_certs": str(tls.ca_file) if tls.ca_file else None,
                               "ssl_certfile": str(tls.cert_file) if tls.cert_file else None,
                               "ssl_keyfile": str(tls.key_file) if tls.key_file else None}
    if not tls.verify:
        log.warning("redis_tls_verify_off: the store's certificate is NOT checked; anyone "
                    "on the path can read and change every session")
        options.update(ssl_cert_reqs="none", ssl_check_hostname=False)
    return options


def _sentinel_clients(location: StoreLocation,
                      common: dict[str, Any]) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """The master's client, and the clients of the sentinels (to close with it)."""
    sentinel_options = {"socket_timeout": common["socket_timeout"],
                        "socket_connect_timeout": common["socket_connect_timeout"]}
    if location.password:
        sentinel_options.update(username=location.username, password=location.password)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        list(location.hosts), sentinel_kwargs=sentinel_options, username=location.username,
        password=location.password, ssl=location.tls, **common)
    assert location.master is not None
    client: aioredis.Redis = sentinel.master_for(location.master, db=location.db)
    return client, list(sentinel.sentinels)


_SCAN_COUNT = 1000  # per ZSCAN call: a bucket larger than a compact set pages by this


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _queue_index_add(pipe: Any, entries: Sequence[tuple[str, str]], ttl: float) -> None:
    """Backend.index_add's commands, on a pipeline. Each index a sorted set scored by each
    member's end (this host's clock, in ms): the same pipeline drops the ended members, and
    the key lives as long as its last one. Not a transaction, so the keys may live on
    different Cluster nodes."""
    now = _now_ms()
    for key, member in entries:
        pipe.zadd(key, {member: now + _ms(ttl)}, gt=True)  # ends only move later
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.pexpire(key, _ms(ttl), gt=True)  # never shorter than its longest
        pipe.pexpire(key, _ms(ttl), nx=True)


def _unended(pairs: Iterable[Sequence[object]], now: int) -> builtins.set[str]:
    """The members of ZSCAN's (member, score) pairs whose end (the score) is after `now`."""
    return {_text(member) for member, score in pairs
            if isinstance(score, int | float) and score > now}


def _ms(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


def _now_ms() -> int:
    return int(time.time() * 1000)


class RedisBackend:
    def __init__(self, client: aioredis.Redis | RedisCluster,
                 helpers: list[aioredis.Redis] | None = None, *,
                 observe: Observer | None = None) -> None:
        self._client = client
        self._helpers = helpers or []  # e.g. Sentinel connections, closed with the client
        self._observe = observe
        self._scripts: dict[str, AsyncScript] = {}  # registered on first use: EVALSHA

    @classmethod
    def from_url(cls, url: str, *, timeout: float, tls: RedisTLSConfig = DEFAULT_TLS,
                 observe: Observer | None = None) -> RedisBackend:
        location = parse_store_url(url)
        common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if location.tls:
            common.update(_tls_options(tls))
        if location.kind == "sentinel":
            return cls(*_sentinel_clients(location, common), observe=observe)
        if location.kind == "cluster":
            return cls(RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in location.hosts],
                username=location.username, password=location.password, **common),
                observe=observe)
        return cls(aioredis.Redis.from_url(url, health_check_interval=30, **common),
                   observe=observe)

    async def get(self, key: str) -> tuple[bytes | None, float | None]:
        reply = await self._run("GET", _GET_WITH_TTL, [key])
        if not isinstance(reply, list):
            return None, None
        value, pttl = reply
        assert isinstance(value, bytes) and isinstance(pttl, int), reply
        return value, (pttl / 1000 if pttl > 0 else None)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._call("SET", self._client.set(key, value, px=_ms(ttl)))

    async def replace(self, key: str, value: bytes, ttl: float) -> bool:
        return bool(await self._call("SET XX", self._client.set(key, value, px=_ms(ttl), xx=True)))

    async def set_beside(self, key: str, value: bytes, ttl: float, anchor: str) -> bool:
        return bool(await self._run("SET beside", _SET_BESIDE, [anchor, key], [value, _ms(ttl)]))

    async def expire(self, key: str, ttl: float) -> None:
        await self._call("PEXPIRE", self._client.pexpire(key, _ms(ttl)))

    async def pop(self, key: str) -> bytes | None:
        value = await self._call("GETDEL", self._client.getdel(key))
        return value if isinstance(value, bytes) else None

    async def delete(self, *keys: str) -> None:
        if keys:
            await self._call("DEL", self._client.delete(*keys))

    async def add_once(self, key: str, ttl: float, value: bytes = b"1") -> bool:
        return bool(await self._call("SET NX", self._client.set(key, value, px=_ms(ttl), nx=True)))

    async def delete_if(self, key: str, value: bytes) -> None:
        await self._run("DEL if", _DELETE_IF, [key], [value])

    async def count(self, key: str, ttl: float) -> int:
        with self._op("INCR"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.pexpire(key, _ms(ttl), nx=True)  # only the first count sets the window
                value, _ = await pipe.execute()
        return int(value)

    async def rate(self, key: str, limit: int, period: float) -> Rate:
        reply = await self._run("GCRA", _GCRA, [key], [limit, int(period * 1_000_000)])
        assert isinstance(reply, list) and len(reply) == 4, reply
        allowed, remaining, retry_us, reset_us = reply
        return Rate(bool(allowed), int(remaining), float(retry_us) / 1_000_000,
                    float(reset_us) / 1_000_000)

    async def set_indexed(self, values: Sequence[tuple[str, bytes]], ttl: float,
                          entries: Sequence[tuple[str, str]]) -> None:
        with self._op("SET indexed"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in values:
                    pipe.set(key, value, px=_ms(ttl))
                _queue_index_add(pipe, entries, ttl)
                await pipe.execute()

    async def index_add(self, entries: Sequence[tuple[str, str]], ttl: float) -> None:
        if not entries:
            return
        with self._op("ZADD"):
            async with self._client.pipeline(transaction=False) as pipe:
                _queue_index_add(pipe, entries, ttl)
                await pipe.execute()

    async def index_members(self, queries: Sequence[tuple[str, str]]
                            ) -> list[builtins.set[str]]:
        """A query with a prefix scans its bucket for the members that begin with it (ZSCAN
        MATCH: the whole of a compact bucket in one reply); one without reads the index whole
        by score. The first page of every query goes in one pipeline."""
        if not queries:
            return []
        now = _now_ms()
        with self._op("ZSCAN"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key, prefix in queries:
                    if prefix:
                        pipe.zscan(key, 0, match=prefix + "*", count=_SCAN_COUNT)
                    else:
                        pipe.zrangebyscore(key, f"({now}", "+inf")
                replies = await pipe.execute()
            found: list[builtins.set[str]] = []
            for (key, prefix), reply in zip(queries, replies, strict=True):
                if not prefix:
                    found.append({_text(m) for m in reply})
                    continue
                cursor, pairs = reply
                members = _unended(pairs, now)
                while cursor:  # a bucket grown past a compact set's size
                    cursor, pairs = await self._client.zscan(key, cursor, match=prefix + "*",
                                                             count=_SCAN_COUNT)
                    members |= _unended(pairs, now)
                found.append(members)
        return found

    async def index_remove(self, entries: Sequence[tuple[str, str]]) -> None:
        if not entries:
            return
        with self._op("ZREM"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key, member in entries:
                    pipe.zrem(key, member)
                await pipe.execute()

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        with self._op("EXISTS"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                answers = await pipe.execute()
        return [bool(answer) for answer in answers]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        with self._op("GET many"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                values = await pipe.execute()
        return [value if isinstance(value, bytes) else None for value in values]

    async def keys(self, prefix: str) -> list[str]:
        with self._op("SCAN"):
            return [key.decode() if isinstance(key, bytes) else str(key)
                    async for key in self._client.scan_iter(match=prefix + "*", count=500)]

    async def ping(self) -> None:
        await self._call("PING", self._client.ping())

    async def eviction_policy(self) -> str | None:
        try:
            answer = await self._client.config_get("maxmemory-policy")
        except (RedisError, OSError, TimeoutError):  # managed services often refuse CONFIG
            return None
        if isinstance(answer, dict) and answer:
            # A Cluster answers per node ({node: {name: value}}); any node's will do.
            value = answer.get("maxmemory-policy", next(iter(answer.values())))
            if isinstance(value, dict):
                value = value.get("maxmemory-policy")
            return value.decode() if isinstance(value, bytes) else value \
                if isinstance(value, str) else None
        return None

    async def publish(self, channel: str, message: str) -> None:
        await self._call("PUBLISH", self._client.publish(channel, message))

    async def listen(self, channel: str,
                     subscribed: Callable[[], None]) -> AsyncIterator[str]:
        """One pub/sub connection, waiting for messages a second at a time (so redis-py's
        health check pings it while it is quiet: a dead connection is noticed)."""
        if isinstance(self._client, RedisCluster):
            with self._op("SUBSCRIBE"):  # its pub/sub finds a node only once the slots are known
                await self._client.initialize()
        pubsub = self._client.pubsub()
        try:
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        subscribed()
                    elif message["type"] == "message":
                        data = message["data"]
                        yield data.decode() if isinstance(data, bytes) else str(data)
            except (RedisError, OSError, TimeoutError) as exc:
                raise StoreUnavailableError(
                    f"redis SUBSCRIBE {channel} lost: {type(exc).__name__}") from exc
        finally:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py

    async def aclose(self) -> None:
        await self._client.aclose()
        for helper in self._helpers:
            await helper.aclose()

    async def _run(self, name: str, script: str, keys: list[str],
                   args: list[bytes | int] | None = None) -> object:
        """A Lua script by its SHA (EVALSHA; loaded by redis-py when the server lacks it)."""
        runner = self._scripts.get(script)
        if runner is None:
            runner = self._scripts[script] = self._client.register_script(script)
        return await self._call(name, runner(keys=keys, args=args or []))

    async def _call(self, name: str, awaitable: object) -> object:
        with self._op(name):
            return await awaitable  # type: ignore[misc]  # redis-py's stubs return unions

    @contextlib.contextmanager
    def _op(self, name: str) -> Iterator[None]:
        """One store call: timed for the observer, and failures translated (fail closed)."""
        started = time.perf_counter()
        failed = False
        try:
            yield
        except (RedisError, OSError, TimeoutError) as exc:
            failed = True
            raise StoreUnavailableError(f"redis {name} failed: {type(exc).__name__}") from exc
        finally:
            if self._observe is not None:
                self._observe(name, time.perf_counter() - started, failed)
