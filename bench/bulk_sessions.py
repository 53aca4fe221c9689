"""Many real sessions in Redis, fast, written by the gateway's own store code.

For the scale rows: SessionStore.create seals each session (AES-GCM under a fresh cookie
key, bound to its name and deployment) and writes its registry entry and indexes, exactly as a
login does; only the wire is different. Its RedisBackend is handed a client that queues every
command on one pipeline instead of sending it, and the pipeline is sent once per `batch`
sessions. Each session is a copy of a real signed-in one (its tokens as the IdP issued them)
with a user of its own (sub, email and IdP sid), so the indexes are as many as a real
population's. The keys written are kept, so `remove` deletes exactly them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from gateway.config import Config
from gateway.sessions.redis import RedisBackend
from gateway.sessions.registry import Browser
from gateway.sessions.store import SessionStore


async def _done(value: object = True) -> object:
    return value


class _Queue:
    """Looks like a redis.asyncio client to RedisBackend: each command is queued on the
    pipeline (its answer taken as a success) and its key (the first argument) kept; for an
    index (a bucket other sessions share: ZADD), the members added instead."""

    def __init__(self, pipe: Any, keys: set[str], members: set[tuple[str, str]]) -> None:
        self._pipe = pipe
        self._keys = keys
        self._members = members

    def queue(self, command: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if command == "zadd":
            self._members.update((args[0], member) for member in args[1])
        elif command not in ("zremrangebyscore", "pexpire") and args \
                and isinstance(args[0], str):
            self._keys.add(args[0])
        getattr(self._pipe, command)(*args, **kwargs)

    def __getattr__(self, command: str) -> Callable[..., Awaitable[object]]:
        def awaited(*args: Any, **kwargs: Any) -> Awaitable[object]:
            self.queue(command, args, kwargs)
            return _done()

        return awaited

    def pipeline(self, transaction: bool = True) -> _Nested:
        return _Nested(self)


class _Nested:
    """The backend's own pipelines (an index update is four commands) join the outer one."""

    def __init__(self, queue: _Queue) -> None:
        self._queue = queue

    async def __aenter__(self) -> _Nested:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, command: str) -> Callable[..., None]:
        def queued(*args: Any, **kwargs: Any) -> None:
            self._queue.queue(command, args, kwargs)

        return queued

    async def execute(self) -> list[object]:
        return []


class Population:
    """Sessions added to the store of the deployment `config` describes (its Redis, issuer,
    client_id and timeouts), each a copy of the session the cookie `template` names."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._client = aioredis.Redis.from_url(config.session.store)
        self.keys: set[str] = set()  # every key written but the indexes
        self.members: set[tuple[str, str]] = set()  # (index, member): every index member
        self.added = 0

    def _store(self, backend: RedisBackend) -> SessionStore:
        session = self._config.session
        return SessionStore(
            backend,
            self._config.store_keys,
            idle_timeout=session.idle_timeout,
            max_lifetime=session.max_lifetime,
            clock=time.time,
        )

    async def add(self, count: int, template: str, batch: int = 500) -> None:
        reader = RedisBackend(self._client)
        loaded = await self._store(reader).load(template)
        if loaded is None:
            raise RuntimeError("the template cookie names no live session")
        model = loaded.session
        browser = Browser(model.client_ip, model.user_agent)
        done = 0
        while done < count:
            pipe = self._client.pipeline(transaction=False)
            store = self._store(RedisBackend(_Queue(pipe, self.keys, self.members)))  # type: ignore[arg-type]
            for _ in range(min(batch, count - done)):
                number = self.added + done
                user = f"bench-user-{number}"
                claims = {
                    **(model.identity.claims or {}),
                    "sub": user,
                    "email": f"{user}@example.com",
                    "sid": f"bench-sid-{number}",
                }
                identity = dataclasses.replace(
                    model.identity,
                    sub=user,
                    email=f"{user}@example.com",
                    sid=f"bench-sid-{number}",
                    claims=claims,
                )
                await store.create(identity, model.tokens, browser)
                done += 1
            await pipe.execute()
        self.added += count

    async def count(self) -> int:
        """The deployment's session records in the store now (every writer's, by SCAN)."""
        prefix = self._config.store_keys.session_prefix
        return sum([1 async for _ in self._client.scan_iter(match=prefix + "*", count=1000)])

    async def remove(self) -> None:
        keys = sorted(self.keys)
        for start in range(0, len(keys), 5000):
            await self._client.unlink(*keys[start : start + 5000])
        members = sorted(self.members)
        for start in range(0, len(members), 5000):
            pipe = self._client.pipeline(transaction=False)
            for index, member in members[start : start + 5000]:
                pipe.zrem(index, member)
            await pipe.execute()
        self.keys.clear()
        self.members.clear()
        self.added = 0

    async def aclose(self) -> None:
        await self._client.aclose()
