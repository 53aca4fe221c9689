"""A long soak of a real `gateway run`, by hand: the fixed traffic mix of tests/soak.py for as
long as you like, with a sample every so often of what the gateway holds.

Processes as in proxy_bench.py: the gateway, the demo IdP and upstream in a second one, and
this driver. Each sample line gives the gateway's RSS and open file descriptors, the keys and
index members under its namespace in Redis and Redis's used memory, and the latency of a
health probe and of a signed-in request. The run ends with the first and the last settled
sample side by side (pooled connections idled out): they should match.

    python bench/soak.py --store redis://127.0.0.1:6379/14 --minutes 10
    python bench/soak.py --store redis://127.0.0.1:6379/14 --minutes 60 --scale 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import (
    BROWSER_HEADERS,
    CLIENT_SECRET,
    free_port,
    login,
    raw_config,
    start_gateway,
    wait_until_ready,
)
from proxy_bench import _serve_backends
from soak import soak

from gateway.sessions.keys import default_prefix
from gateway.upstreams import KEEPALIVE_TIMEOUT


@dataclass
class Sample:
    rss_mib: float
    fds: int
    keys: int
    members: int
    redis_mib: float
    probe_ms: float
    signed_in_ms: float


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _timed_ms(http: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with http.get(url) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return (time.perf_counter() - started) * 1000


async def _sample(pid: int, store: aioredis.Redis, prefix: str, gateway: str,
                  signed_in: aiohttp.ClientSession) -> Sample:
    keys = [key async for key in store.scan_iter(match=prefix + ":*", count=500)]
    members = 0
    for key in keys:
        if await store.type(key) == b"zset":
            members += await store.zcard(key)
    memory = await store.info("memory")
    return Sample(_rss_mib(pid), len(os.listdir(f"/proc/{pid}/fd")), len(keys), members,
                  int(memory["used_memory"]) / 2**20,
                  await _timed_ms(signed_in, gateway + "/oauth2/healthz"),
                  await _timed_ms(signed_in, gateway + "/echo"))


def _line(label: str, sample: Sample) -> str:
    rss, fds, keys, members, redis_mib, probe, signed_in = astuple(sample)
    return (f"{label:<10} rss {rss:7.1f} MiB  fds {fds:4d}  keys {keys:5d}  members {members:5d}"
            f"  redis {redis_mib:6.1f} MiB  probe {probe:6.1f} ms  signed-in {signed_in:6.1f} ms")


async def _drive(args: argparse.Namespace, pid: int, gateway: str, prefix: str) -> None:
    store = aioredis.Redis.from_url(args.store)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar, headers=BROWSER_HEADERS) as signed_in:
        await login(signed_in, gateway, "/echo")
        await soak(gateway, 5, scale=args.scale)  # warm up
        await asyncio.sleep(KEEPALIVE_TIMEOUT + 1)
        first = await _sample(pid, store, prefix, gateway, signed_in)
        print(_line("start", first), flush=True)
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            seconds = min(args.sample_every, end - time.monotonic())
            running = asyncio.create_task(soak(gateway, seconds, scale=args.scale))
            await asyncio.sleep(seconds / 2)
            print(_line("load", await _sample(pid, store, prefix, gateway, signed_in)),
                  flush=True)
            done = await running
            print(f"{'':<10} {dict(done)}", flush=True)
        await asyncio.sleep(KEEPALIVE_TIMEOUT + 1)
        last = await _sample(pid, store, prefix, gateway, signed_in)
        print(_line("start", first))
        print(_line("settled", last))
    await store.aclose()


async def main(args: argparse.Namespace) -> None:
    gw_port, idp_port, upstream_port = free_port(), free_port(), free_port()
    gateway = f"http://127.0.0.1:{gw_port}"
    idp = f"http://127.0.0.1:{idp_port}"
    upstream = f"http://127.0.0.1:{upstream_port}"
    backends = multiprocessing.get_context("spawn").Process(
        target=_serve_backends, args=(idp_port, upstream_port, gateway), daemon=True)
    backends.start()
    with tempfile.TemporaryDirectory() as workdir:
        raw = raw_config(gateway, idp, upstream, store=args.store,
                         server={"login_starts_per_minute": 0})
        await wait_until_ready(upstream + "/echo")
        proc = await start_gateway(raw, Path(workdir) / "gateway.yaml",
                                   env={**os.environ, "SECRET": CLIENT_SECRET})
        try:
            await wait_until_ready(gateway + "/oauth2/readyz")
            prefix = default_prefix(idp, raw["oidc"]["client_id"])
            await _drive(args, proc.pid, gateway, prefix)
        finally:
            proc.terminate()
            await proc.wait()
            backends.terminate()
            backends.join()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="a Redis URL (a database of its own)")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--scale", type=int, default=1, help="multiplies the traffic's workers")
    parser.add_argument("--sample-every", type=float, default=30, help="seconds")
    asyncio.run(main(parser.parse_args()))
