"""`gateway sessions list|revoke`: the session admin commands, for ops.

They read the same config as `gateway run` and talk to the same store; they need neither
session keys (they use the clear-text registry, see sessions/registry.py) nor the client
secret, and never print a token or a cookie.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.observability import audit_log
from gateway.sessions.backends import open_backend
from gateway.sessions.registry import Registry, SessionInfo

_COLUMNS = ("session", "created", "last seen", "idle until", "expires", "user", "email",
            "client ip", "user agent")
_SHORT_ID = 12  # hex digits of the session's storage id shown in the table


class UsageError(Exception):
    """A command line that names no or several sessions: the CLI's usage error (exit 2)."""


@dataclass(frozen=True, slots=True)
class Row:
    info: SessionInfo
    idle_until: float | None  # when the session ends if unused (its record's TTL)


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _shown(text: str) -> str:
    """A value fit for a terminal: what the IdP or a browser chose may hold anything, and
    neither a surrogate (an encoding error) nor a control sequence may reach the screen."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else "?" for c in escaped)


def format_table(rows: Sequence[Row]) -> str:
    cells = [_COLUMNS] + [
        (r.info.storage_id[:_SHORT_ID], _when(r.info.created_at), _when(r.info.last_seen),
         _when(r.idle_until), _when(r.info.expires_at), _shown(r.info.sub or "-"),
         _shown(r.info.email or "-"), _shown(r.info.client_ip), _shown(r.info.user_agent[:40]))
        for r in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join([*lines, f"{len(rows)} session(s)"])


def format_json(rows: Sequence[Row]) -> str:
    return json.dumps([{
        "session": r.info.storage_id, "created": _when(r.info.created_at),
        "last_seen": _when(r.info.last_seen), "idle_until": _when(r.idle_until),
        "expires": _when(r.info.expires_at), "user": r.info.sub, "email": r.info.email,
        "client_ip": r.info.client_ip, "user_agent": r.info.user_agent,
    } for r in rows], indent=2)


_SESSION_ID = re.compile(r"[0-9a-f]{6,64}")


async def _select(registry: Registry, user: str | None, session: str | None) -> list[SessionInfo]:
    if user:
        return await registry.by_user(user)
    if session is not None and not _SESSION_ID.fullmatch(session.lower()):
        raise UsageError(f"--session {session!r}: give a session id as listed (at least 6 "
                         "of its hex digits)")
    everything = await registry.all()
    if session is None:
        return everything
    chosen = [info for info in everything if info.storage_id.startswith(session.lower())]
    if len(chosen) > 1:
        raise UsageError(f"--session {session} names {len(chosen)} sessions: give more of its id")
    return chosen


async def run(config: Config, action: str, *, user: str | None = None,
              session: str | None = None, every: bool = False,
              as_json: bool = False) -> tuple[str, int]:
    """What to print, and how many sessions the command named."""
    if config.session.store == "memory://":
        raise ConfigError("session.store", "memory:// sessions live inside the gateway "
                                           "process; the sessions commands need a Redis store")
    if action == "revoke" and not (user or session or every):
        raise UsageError("name what to revoke: --user, --session or --all")
    backend = open_backend(config.session, clock=time.time)
    try:
        registry = Registry(backend, config.store_keys)
        infos = await _select(registry, user, session)
        if action == "revoke":
            revoked = await registry.revoke(infos)
            audit_log.info("session_revoked by=%s sessions=%d user=%s session=%s all=%s",
                           "admin", revoked, user, session, every)
            return f"revoked {revoked} session(s)", revoked
        now = time.time()
        rows = []
        for info in infos:
            ttl = await registry.idle_ttl(info.storage_id)
            rows.append(Row(info, now + ttl if ttl is not None else None))
        return (format_json(rows) if as_json else format_table(rows)), len(rows)
    finally:
        await backend.aclose()
