"""`gateway sessions list|revoke`: the session admin commands, for ops.

They read the same config as `gateway run` and talk to the same store; they need no session
keys (they use the clear-text registry, see sessions/registry.py) and never print a token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.sessions.backends import open_backend
from gateway.sessions.registry import Registry, SessionInfo

_COLUMNS = ("created", "last seen", "expires", "user", "email", "client ip", "user agent")


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_table(infos: Sequence[SessionInfo]) -> str:
    rows = [_COLUMNS] + [
        (_when(i.created_at), _when(i.last_seen), _when(i.expires_at), i.sub, i.email or "-",
         i.client_ip, i.user_agent[:40]) for i in infos]
    widths = [max(len(row[c]) for row in rows) for c in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join([*lines, f"{len(infos)} session(s)"])


async def run(config: Config, action: str, user: str | None, every: bool) -> str:
    if config.session.store == "memory://":
        raise ConfigError("session.store", "memory:// sessions live inside the gateway "
                                           "process; the sessions commands need a Redis store")
    backend = open_backend(config.session, clock=time.time)
    try:
        registry = Registry(backend, config.store_keys, config.session.max_lifetime)
        infos = await (registry.by_user(user) if user else registry.all())
        if action == "list":
            return format_table(infos)
        if not user and not every:
            raise ConfigError("--user", "name a user (sub or email), or pass --all")
        return f"revoked {await registry.revoke(infos)} session(s)"
    finally:
        await backend.aclose()
