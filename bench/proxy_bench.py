"""Measure the per-request cost of the gateway: direct upstream vs. through the gateway.

Three processes, as in production: the gateway (`gateway run`, memory store or Redis with
--store redis://...), the demo IdP and sample upstream in a second one, and this load generator.
It signs in once, then sends a bounded number of requests with a fixed concurrency to each
target and prints requests/s and latency percentiles, one row per target; with Redis, also the
Redis commands each signed-in request cost (from INFO commandstats). The processes share the
machine's cores, so compare rows of one run only.

    python bench/proxy_bench.py --requests 5000 --concurrency 20
    python bench/proxy_bench.py --store redis://127.0.0.1:6379/15
    python bench/proxy_bench.py --store redis://127.0.0.1:6379/15 --workers 2 --wrk 10

With --wrk SECONDS the load comes from wrk (Debian's package), 2 threads, --concurrency
connections, for that long per row: the Python load generator needs a core of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import wrk  # bench/wrk.py
from conftest import (
    BROWSER_HEADERS,
    CLIENT_ID,
    CLIENT_SECRET,
    free_port,
    login,
    raw_config,
    serve,
    start_gateway,
    wait_until_ready,
)

from gateway.demo.idp import DemoClient, create_idp_app
from gateway.demo.upstream import create_upstream_app


def _serve_backends(idp_port: int, upstream_port: int, gateway: str) -> None:
    """The IdP and the upstream, in a process of their own (the target of a child process)."""
    async def run() -> None:
        idp = f"http://127.0.0.1:{idp_port}"
        client = DemoClient(CLIENT_ID, CLIENT_SECRET, (gateway + "/oauth2/callback",))
        await serve(create_idp_app(idp, [client]), idp_port)
        await serve(create_upstream_app(), upstream_port)
        await asyncio.Event().wait()

    asyncio.run(run())


async def _load(http: aiohttp.ClientSession, url: str, total: int,
                concurrency: int) -> list[float]:
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with http.get(url) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _row(name: str, latencies: list[float], elapsed: float) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p = statistics.quantiles(ms, n=100)
    return (f"{name:<28} {len(ms) / elapsed:>9.0f} req/s   p50 {p[49]:6.2f} ms   "
            f"p90 {p[89]:6.2f} ms   p99 {p[98]:6.2f} ms")


_OWN_COMMANDS = ("cmdstat_info", "cmdstat_select", "cmdstat_client", "cmdstat_hello")


def _redis_calls(url: str) -> int:
    """Commands served so far, leaving out those of this very check (its connection setup
    and the INFO itself)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(entry["calls"]) for name, entry in stats.items()
               if not name.startswith(_OWN_COMMANDS))


def _wrk_row(url: str, cookie: str, seconds: float, connections: int) -> tuple[str, int]:
    """A wrk run: the row, and the requests it made."""
    result = wrk.run(url, {"Cookie": f"gateway_session={cookie}"}, seconds, connections)
    row = (f"{result.rate:>9.0f} req/s   p50 {result.p50:.2f}ms   p90 {result.p90:.2f}ms   "
           f"p99 {result.p99:.2f}ms"
           + (f"   NON-2xx: {result.non_2xx}" if result.non_2xx else ""))
    return row, result.total


async def _measure(args: argparse.Namespace, gateway: str, upstream: str) -> None:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar, headers=BROWSER_HEADERS) as http:
        await login(http, gateway, "/echo")
        cookie = next(c.value for c in jar if c.key == "gateway_session")
        load = f"wrk {args.wrk:g} s per row" if args.wrk else f"{args.requests} requests"
        print(f"{load}, concurrency {args.concurrency}, store {args.store}, "
              f"workers {args.workers}, cache_ttl {args.cache_ttl}")
        for name, url in (("upstream direct", upstream + "/echo"),
                          ("gateway public route", gateway + "/public/echo"),
                          ("gateway with session", gateway + "/echo")):
            await _load(http, url, min(200, args.requests), args.concurrency)  # warm up
            calls = _redis_calls(args.store) if args.store.startswith("redis") else 0
            if args.wrk:
                row, total = await asyncio.to_thread(_wrk_row, url, cookie, args.wrk,
                                                     args.concurrency)
                print(f"{name:<28} {row}")
            else:
                started = time.perf_counter()
                latencies = await _load(http, url, args.requests, args.concurrency)
                total = args.requests
                print(_row(name, latencies, time.perf_counter() - started))
            if args.store.startswith("redis"):
                per_request = (_redis_calls(args.store) - calls) / total
                print(f"{'':<28} Redis commands per request: {per_request:.2f}")


async def main(args: argparse.Namespace) -> None:
    gw_port, idp_port, upstream_port = free_port(), free_port(), free_port()
    gateway = f"http://127.0.0.1:{gw_port}"
    upstream = f"http://127.0.0.1:{upstream_port}"
    backends = multiprocessing.get_context("spawn").Process(
        target=_serve_backends, args=(idp_port, upstream_port, gateway), daemon=True)
    backends.start()
    with tempfile.TemporaryDirectory() as workdir:
        raw = raw_config(gateway, f"http://127.0.0.1:{idp_port}", upstream, store=args.store,
                         server={"workers": args.workers},
                         session={"cache_ttl": args.cache_ttl})
        await wait_until_ready(upstream + "/echo")
        # The access log is written (to nowhere), as in production.
        proc = await start_gateway(raw, Path(workdir) / "gateway.yaml",
                                   env={**os.environ, "SECRET": CLIENT_SECRET})
        try:
            await wait_until_ready(gateway + "/oauth2/readyz")
            await _measure(args, gateway, upstream)
        finally:
            proc.terminate()
            await proc.wait()
            backends.terminate()
            backends.join()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--store", default="memory://")
    parser.add_argument("--workers", default=1, type=lambda v: v if v == "auto" else int(v))
    parser.add_argument("--cache-ttl", default="0s", help="session.cache_ttl, e.g. 1s")
    parser.add_argument("--wrk", type=float, default=0, metavar="SECONDS",
                        help="load with wrk for this long per row (needs wrk)")
    arguments = parser.parse_args()
    if arguments.wrk and shutil.which("wrk") is None:
        parser.error("--wrk needs wrk (apt-get install wrk)")
    asyncio.run(main(arguments))
