"""Measure the per-request cost of the gateway: direct upstream vs. through the gateway.

Starts the demo IdP, the sample upstream and a gateway on loopback (memory store, or Redis
with --store redis://...), signs in once, then sends a bounded number of requests with a fixed
concurrency to each target and prints requests/s and latency percentiles, one row per target.
Compare rows of one run only; the load generator shares the machine's cores.

    python bench/proxy_bench.py --requests 5000 --concurrency 20
    python bench/proxy_bench.py --store redis://127.0.0.1:6379/15
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import BROWSER_HEADERS, CLIENT_ID, CLIENT_SECRET, free_port, login, raw_config, serve

from gateway import config as config_module
from gateway.app import build_app
from gateway.demo.idp import DemoClient, create_idp_app
from gateway.demo.upstream import create_upstream_app


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


async def main(args: argparse.Namespace) -> None:
    gw_port, idp_port = free_port(), free_port()
    gateway, idp = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{idp_port}"
    client = DemoClient(CLIENT_ID, CLIENT_SECRET, (gateway + "/oauth2/callback",))
    runners = [(await serve(create_idp_app(idp, [client]), idp_port))[0]]
    runner, upstream = await serve(create_upstream_app())
    runners.append(runner)
    raw = raw_config(gateway, idp, upstream, store=args.store)
    config = config_module.parse(raw, {"SECRET": CLIENT_SECRET})
    runners.append((await serve(build_app(config), gw_port))[0])
    try:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar, headers=BROWSER_HEADERS) as http:
            await login(http, gateway, "/echo")
            print(f"{args.requests} requests, concurrency {args.concurrency}, "
                  f"store {args.store}")
            for name, url in (("upstream direct", upstream + "/echo"),
                              ("gateway public route", gateway + "/public/echo"),
                              ("gateway with session", gateway + "/echo")):
                await _load(http, url, min(200, args.requests), args.concurrency)  # warm up
                started = time.perf_counter()
                latencies = await _load(http, url, args.requests, args.concurrency)
                print(_row(name, latencies, time.perf_counter() - started))
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--store", default="memory://")
    asyncio.run(main(parser.parse_args()))
