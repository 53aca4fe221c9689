"""RedisBackend on redis.asyncio: one pooled client, a timeout on every call, fail closed.

Every redis/socket failure becomes StoreUnavailableError here (and nowhere else), which the
error middleware turns into a 503: a store that is down never lets a request through unchecked.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import StoreUnavailableError

# Compare-and-delete in one step, so a lock that expired and was taken by another replica is
# never released by the late holder. One key: safe on a Cluster.
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


class RedisBackend:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    @classmethod
    def from_url(cls, url: str, *, timeout: float) -> RedisBackend:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            retry_on_timeout=False,
        )
        return cls(client)

    async def get(self, key: str) -> tuple[bytes | None, float | None]:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                value, pttl = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"redis GET failed: {type(exc).__name__}") from exc
        if value is None:
            return None, None
        return value, (pttl / 1000 if pttl and pttl > 0 else None)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._call("SET", self._client.set(key, value, px=_ms(ttl)))

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
        await self._call("EVAL", self._client.eval(_DELETE_IF, 1, key, value))

    async def index_add(self, key: str, member: str, ttl: float) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.sadd(key, member)
                # GT: never shorten the index below the longest session it points to.
                pipe.pexpire(key, _ms(ttl), gt=True)
                pipe.pexpire(key, _ms(ttl), nx=True)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"redis SADD failed: {type(exc).__name__}") from exc

    async def index_members(self, key: str) -> builtins.set[str]:
        members = await self._call("SMEMBERS", self._client.smembers(key))
        assert isinstance(members, set)
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    async def index_remove(self, key: str, members: Iterable[str]) -> None:
        values = list(members)
        if values:
            await self._call("SREM", self._client.srem(key, *values))

    async def keys(self, prefix: str) -> list[str]:
        try:
            return [key.decode() if isinstance(key, bytes) else str(key)
                    async for key in self._client.scan_iter(match=prefix + "*", count=500)]
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"redis SCAN failed: {type(exc).__name__}") from exc

    async def ping(self) -> None:
        await self._call("PING", self._client.ping())

    async def aclose(self) -> None:
        await self._client.aclose()

    @staticmethod
    async def _call(name: str, awaitable: object) -> object:
        try:
            return await awaitable  # type: ignore[misc]  # redis-py's stubs return unions
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailableError(f"redis {name} failed: {type(exc).__name__}") from exc
