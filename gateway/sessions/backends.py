"""Where sealed records live: the Backend protocol and the embedded in-memory backend.

A backend stores opaque bytes with a TTL and knows nothing of sessions or crypto, so one
contract test suite covers every backend. `open_backend(config)` picks one from the store URL.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.config import SessionConfig

_SWEEP_INTERVAL = 60.0  # seconds between purges of expired memory records


@dataclass(frozen=True, slots=True)
class Rate:
    """One request's place in a rate limit (GCRA: `limit` requests at once, refilled evenly
    over the period): let through or not, how many more would be now, and in how many
    seconds the next one would be (retry_after) and the whole quota would be back (reset)."""

    allowed: bool
    remaining: int
    retry_after: float
    reset: float


def gcra(tat: float | None, now: float, limit: int, period: float) -> tuple[Rate, float]:
    """The Generic Cell Rate Algorithm on a bucket's theoretical arrival time `tat`: the
    decision and the new tat (unchanged when refused). The Redis backend runs the same steps
    in a script, on the server's clock."""
    interval = period / limit
    start = max(tat if tat is not None else now, now)
    new_tat = start + interval
    allow_at = new_tat - interval * limit
    if now < allow_at:
        return Rate(False, 0, allow_at - now, start - now), start
    return Rate(True, int((now - allow_at) // interval), 0.0, new_tat - now), new_tat


class Backend(Protocol):
    async def get(self, key: str) -> tuple[bytes | None, float | None]:
        """The value and its remaining TTL in seconds (None when absent), in one round trip."""

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def set_indexed(self, values: Sequence[tuple[str, bytes]], ttl: float,
                          entries: Sequence[tuple[str, str]]) -> None:
        """Set each (key, value) for `ttl`, and add each (index, member) pair for as long
        (as index_add does), all in one round trip: a new session's writes."""

    async def replace(self, key: str, value: bytes, ttl: float) -> bool:
        """Overwrite `key` only while it exists (SET XX); False if it is gone. Every write
        that follows a read uses this, so a record deleted meanwhile (sign-out, revocation)
        is never brought back."""

    async def set_beside(self, key: str, value: bytes, ttl: float, anchor: str) -> bool:
        """Set `key` only while `anchor` exists, in one atomic step; False if it does not.
        (A registry entry beside its session: written while the session lives, never after
        it was revoked. On a Cluster both keys share a hash tag.)"""

    async def expire(self, key: str, ttl: float) -> None: ...

    async def pop(self, key: str) -> bytes | None:
        """Get and delete atomically: what makes a login attempt single use."""

    async def delete(self, *keys: str) -> None: ...

    async def add_once(self, key: str, ttl: float, value: bytes = b"1") -> bool:
        """Create `key` unless it exists; False if it did (replay detection, locks)."""

    async def delete_if(self, key: str, value: bytes) -> None:
        """Delete `key` only while it still holds `value` (releasing a lock we own)."""

    async def count(self, key: str, ttl: float) -> int:
        """Add one to a counter and return it; the counter expires `ttl` after it was
        created, however often it is counted (fixed-window rate limits)."""

    async def rate(self, key: str, limit: int, period: float) -> Rate:
        """One request against the GCRA bucket `key` (`limit` per `period` seconds), decided
        and counted in one atomic step, shared by every replica."""

    async def index_add(self, entries: Sequence[tuple[str, str]], ttl: float) -> None:
        """Add each (index, member) pair, in one round trip, for `ttl` seconds from now; a
        member's time only ever grows (a touch renews it). The same call drops the members
        of those indexes whose time has passed, and an index lives as long as its longest
        member: nothing keeps a dead member, and no index grows with logins."""

    async def index_members(self, queries: Sequence[tuple[str, str]]
                            ) -> list[builtins.set[str]]:
        """For each (index, prefix): its members that begin with `prefix` and whose time
        has not passed. One round trip (a bucket too large to scan at once takes more)."""

    async def index_remove(self, entries: Sequence[tuple[str, str]]) -> None:
        """Remove each (index, member) pair, in one round trip."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of several keys in one round trip (None where absent)."""

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys exist, in one round trip; reads nothing and touches nothing."""

    async def keys(self, prefix: str) -> list[str]:
        """Every live key starting with `prefix` (admin listing; not for the request path)."""

    async def ping(self) -> None: ...

    async def eviction_policy(self) -> str | None:
        """The store's policy when it runs out of memory, if it will say (None: it will not,
        or it never evicts on its own)."""

    async def publish(self, channel: str, message: str) -> None:
        """Tell every listener of `channel`, in every process sharing the store."""

    def listen(self, channel: str, subscribed: Callable[[], None]) -> AsyncIterator[str]:
        """The messages published on `channel` from the moment `subscribed` is called (the
        subscription is confirmed) on; StoreUnavailableError when the connection is lost
        (nothing published meanwhile will be seen: listen again)."""

    async def aclose(self) -> None: ...


class MemoryBackend:
    """Embedded store for a single instance; same TTL semantics as Redis."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._data: dict[str, tuple[bytes, float]] = {}
        self._sets: dict[str, dict[str, float]] = {}  # index -> member -> until
        self._listeners: dict[str, builtins.set[asyncio.Queue[str]]] = {}
        self._next_sweep = clock() + _SWEEP_INTERVAL

    def _live(self, key: str) -> tuple[bytes, float] | None:
        entry = self._data.get(key)
        if entry is not None and entry[1] <= self._clock():
            del self._data[key]
            return None
        return entry

    def _sweep(self) -> None:
        now = self._clock()
        if now >= self._next_sweep:
            self._data = {k: v for k, v in self._data.items() if v[1] > now}
            self._sets = {k: live for k, members in self._sets.items()
                          if (live := {m: t for m, t in members.items() if t > now})}
            self._next_sweep = now + _SWEEP_INTERVAL

    async def get(self, key: str) -> tuple[bytes | None, float | None]:
        entry = self._live(key)
        return (entry[0], entry[1] - self._clock()) if entry else (None, None)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._sweep()
        self._data[key] = (value, self._clock() + ttl)

    async def set_indexed(self, values: Sequence[tuple[str, bytes]], ttl: float,
                          entries: Sequence[tuple[str, str]]) -> None:
        for key, value in values:
            await self.set(key, value, ttl)
        await self.index_add(entries, ttl)

    async def replace(self, key: str, value: bytes, ttl: float) -> bool:
        if self._live(key) is None:
            return False
        self._data[key] = (value, self._clock() + ttl)
        return True

    async def set_beside(self, key: str, value: bytes, ttl: float, anchor: str) -> bool:
        if self._live(anchor) is None:
            return False
        await self.set(key, value, ttl)
        return True

    async def expire(self, key: str, ttl: float) -> None:
        entry = self._live(key)
        if entry is not None:
            self._data[key] = (entry[0], self._clock() + ttl)

    async def pop(self, key: str) -> bytes | None:
        entry = self._live(key)
        self._data.pop(key, None)
        return entry[0] if entry else None

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._data.pop(key, None)
            self._sets.pop(key, None)

    async def add_once(self, key: str, ttl: float, value: bytes = b"1") -> bool:
        if self._live(key) is not None:
            return False
        await self.set(key, value, ttl)
        return True

    async def delete_if(self, key: str, value: bytes) -> None:
        entry = self._live(key)
        if entry is not None and entry[0] == value:
            del self._data[key]

    async def count(self, key: str, ttl: float) -> int:
        self._sweep()
        entry = self._live(key)
        value = int(entry[0]) + 1 if entry else 1
        self._data[key] = (str(value).encode(), entry[1] if entry else self._clock() + ttl)
        return value

    async def rate(self, key: str, limit: int, period: float) -> Rate:
        self._sweep()
        entry = self._live(key)
        now = self._clock()
        decision, tat = gcra(float(entry[0]) if entry else None, now, limit, period)
        if decision.allowed:
            self._data[key] = (repr(tat).encode(), tat)
        return decision

    def _live_set(self, key: str) -> dict[str, float]:
        now = self._clock()
        members = {m: t for m, t in self._sets.get(key, {}).items() if t > now}
        if members:
            self._sets[key] = members
        else:
            self._sets.pop(key, None)
        return members

    async def index_add(self, entries: Sequence[tuple[str, str]], ttl: float) -> None:
        self._sweep()
        for key, member in entries:
            members = self._live_set(key)
            members[member] = max(self._clock() + ttl, members.get(member, 0.0))
            self._sets[key] = members

    async def index_members(self, queries: Sequence[tuple[str, str]]
                            ) -> list[builtins.set[str]]:
        return [{m for m in self._live_set(key) if m.startswith(prefix)}
                for key, prefix in queries]

    async def index_remove(self, entries: Sequence[tuple[str, str]]) -> None:
        for key, member in entries:
            live = self._live_set(key)
            live.pop(member, None)
            if not live:
                self._sets.pop(key, None)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [entry[0] if (entry := self._live(key)) else None for key in keys]

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self._live(key) is not None for key in keys]

    async def keys(self, prefix: str) -> list[str]:
        return [k for k in list(self._data) if k.startswith(prefix) and self._live(k)]

    async def ping(self) -> None:
        return None

    async def eviction_policy(self) -> str | None:
        return None

    async def publish(self, channel: str, message: str) -> None:
        for queue in self._listeners.get(channel, ()):
            queue.put_nowait(message)

    async def listen(self, channel: str,
                     subscribed: Callable[[], None]) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._listeners.setdefault(channel, set()).add(queue)
        try:
            subscribed()
            while True:
                yield await queue.get()
        finally:
            self._listeners[channel].discard(queue)

    async def aclose(self) -> None:
        self._data.clear()
        self._sets.clear()


# Told of every store call: its operation, how long it took, and whether it failed.
Observer = Callable[[str, float, bool], None]


def open_backend(config: SessionConfig, *, clock: Callable[[], float],
                 observe: Observer | None = None) -> Backend:
    """`observe` sees Redis's calls (the metrics); the in-memory store's are not calls."""
    if config.store_location.kind == "memory":
        return MemoryBackend(clock)
    from gateway.sessions.redis import RedisBackend  # only deployments with Redis import it

    return RedisBackend.from_url(config.store, timeout=config.store_timeout,
                                 tls=config.redis_tls, observe=observe)
