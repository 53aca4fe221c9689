"""A bounded soak in CI: after a minute of mixed traffic (logins, sign-outs, requests,
WebSockets cut without a close frame, downloads left mid-stream), the gateway holds what it held
before: file descriptors, asyncio tasks, keys and index members in the store; and it logged no
error."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest
from conftest import Stack, StackFactory
from soak import soak

from gateway.runtime import RUNTIME
from gateway.sessions.redis import RedisBackend
from gateway.upstreams import KEEPALIVE_TIMEOUT

pytestmark = pytest.mark.e2e

SOAK_SECONDS = 40.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def store_footprint(stack: Stack) -> tuple[int, int]:
    """Keys under the gateway's namespace, and members of its indexes."""
    store = stack.runners[-1].app[RUNTIME].sessions
    backend = store.backend
    assert isinstance(backend, RedisBackend)
    client: Any = backend._client
    keys = await backend.keys(store.keys.prefix + ":")
    members = 0
    for key in keys:
        if await client.type(key) in (b"zset", "zset"):
            members += await client.zcard(key)
    return len(keys), members


def tasks() -> int:
    """Tasks other than those serving an open HTTP connection (the fds count those)."""
    return sum("RequestHandler.start" not in repr(task.get_coro())
               for task in asyncio.all_tasks())


async def settled(stack: Stack) -> tuple[int, int, tuple[int, int]]:
    """fds, tasks and the store's footprint, once pooled upstream connections idled out."""
    await asyncio.sleep(KEEPALIVE_TIMEOUT + 1.5)
    return open_fds(), tasks(), await store_footprint(stack)


async def test_a_soak_leaves_nothing_behind(make_stack: StackFactory, redis_url: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    stack = await make_stack(store=redis_url, server={"login_starts_per_minute": 0})
    await soak(stack.gateway, 3)  # warm up: pools at their working size
    before = await settled(stack)
    caplog.clear()
    caplog.set_level(logging.INFO)
    done = await soak(stack.gateway, SOAK_SECONDS)
    after = await settled(stack)
    assert done["logins"] >= 20 and done["requests"] >= 500, done
    assert done["websockets"] >= 50 and done["downloads_left"] >= 20, done
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    fds, task_count, footprint = after
    assert footprint == before[2]  # the store: keys and index members
    assert task_count <= before[1], [repr(t.get_coro()) for t in asyncio.all_tasks()]
    # In this one process: a keep-alive connection to the IdP (15 s) may linger, and is two
    # fds here (client and server side).
    assert fds <= before[0] + 4, (before, after)
