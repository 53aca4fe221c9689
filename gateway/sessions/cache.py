"""Recently loaded sessions (`session.cache_ttl`), kept true by invalidations from the store.

A session loaded in the last `cache_ttl` seconds is served from this process's memory,
unsealed, with no store round trip. The cache is only used while this process listens to
the deployment's invalidation channel (pub/sub): every sign-out, revocation (back-channel,
front-channel, the sessions page, the admin CLI) and refresh names the session there, from
whichever process or replica did it, and every listening process drops its copy at once. So
a revocation lands everywhere within the time the message takes, not `cache_ttl`.

Failing closed: until the subscription is confirmed, and from the moment the connection is
lost until it is back, nothing is served from the cache or put in it (the store is asked, as
without a cache), and the cache is emptied on both edges, since messages sent meanwhile were
missed. A load that was under way when any invalidation arrived is not cached (it may have
read the record just before it was revoked). What remains is a connection that dies without
a word: redis-py pings it every 30 s while quiet, and `cache_ttl` (at most 10 s) bounds
what it can cost meanwhile.

Entries are keyed by the SHA-256 of the whole cookie as the browser sent it, so only the
exact cookie that loaded an entry is served from it, and a hit costs one hash: the cookie is
not even parsed. (A lookup's timing can tell at most whether the hash of what was sent shares
a prefix with the hash of a live cookie, which gives no way to a cookie.) A second map, by
storage id, is what invalidations use.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.errors import StoreUnavailableError
from gateway.sessions.backends import Backend
from gateway.sessions.cookies import SessionCookie

if TYPE_CHECKING:
    from gateway.sessions.store import Loaded

log = logging.getLogger("gateway.store")

ENTRIES = 10_000  # sessions kept unsealed at most, per process
_RETRY_MAX = 10.0  # seconds between attempts to listen again, at most


def _digest(cookie_value: str) -> bytes:
    return hashlib.sha256(cookie_value.encode()).digest()


class RecentSessions:
    def __init__(self, ttl: float, clock: Callable[[], float],
                 usable: Callable[[Loaded], bool]) -> None:
        self._ttl = ttl
        self._clock = clock
        self._usable = usable  # still within max_lifetime
        # sha256 of the cookie -> (when it was loaded, what was loaded), oldest first
        self._entries: OrderedDict[bytes, tuple[float, Loaded]] = OrderedDict()
        self._by_id: dict[str, bytes] = {}  # storage id -> its entry's key
        self._listening = False
        self._generation = 0  # moves on with every invalidation, and on both edges

    @property
    def on(self) -> bool:
        return self._ttl > 0 and self._listening

    def get(self, cookie_value: str) -> Loaded | None:
        """The session the exact cookie `cookie_value` loaded within the last ttl."""
        digest = _digest(cookie_value)
        entry = self._entries.get(digest) if self.on else None
        if entry is None:
            return None
        loaded_at, loaded = entry
        if self._clock() - loaded_at >= self._ttl or not self._usable(loaded):
            self._forget(loaded.storage_id)
            return None
        self._entries.move_to_end(digest)
        return loaded

    @property
    def generation(self) -> int:
        """Taken before a load; `put` caches it only if no invalidation came meanwhile."""
        return self._generation

    def put(self, cookie: SessionCookie, loaded: Loaded | None, generation: int) -> None:
        self._forget(cookie.storage_id)
        if loaded is None or not self.on or generation != self._generation:
            return
        digest = _digest(cookie.value)
        self._entries[digest] = (self._clock(), loaded)
        self._by_id[cookie.storage_id] = digest
        while len(self._entries) > ENTRIES:
            _, (_, oldest) = self._entries.popitem(last=False)
            self._by_id.pop(oldest.storage_id, None)

    def _forget(self, storage_id: str) -> None:
        digest = self._by_id.pop(storage_id, None)
        if digest is not None:
            self._entries.pop(digest, None)

    def drop(self, storage_ids: list[str]) -> None:
        for storage_id in storage_ids:
            self._forget(storage_id)
        self._generation += 1

    def _listening_now(self, listening: bool) -> None:
        self._listening = listening
        self._entries.clear()
        self._by_id.clear()
        self._generation += 1

    async def follow(self, backend: Backend, channel: str) -> None:
        """Listen to `channel` for as long as the app runs (a task of its own), again after
        each loss of the connection, with a growing pause."""
        pause = 0.5

        def subscribed() -> None:
            nonlocal pause
            pause = 0.5
            self._listening_now(True)

        while True:
            try:
                async for message in backend.listen(channel, subscribed):
                    self.drop(message.split())
            except StoreUnavailableError as exc:
                log.warning("session_cache_off detail=%s: sessions are read from the store "
                            "until the invalidation channel is back", exc.detail)
            except Exception:  # a bug: still fail closed, and keep trying
                log.exception("session_cache_off: the invalidation listener failed")
            finally:
                self._listening_now(False)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX)
