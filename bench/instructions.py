"""What one request costs in CPU instructions, counted by valgrind's callgrind: the same
number on every run, whatever else the machine is doing.

Throughput on this 2-core machine varies by 10-20% from one wrk run to the next (wrk, nginx
and the server under test share the cores with whatever else runs), so a lever worth 3% can
never be seen in req/s. Instructions can: the server runs under callgrind with counting
off, and counting is switched on only while `--requests` sequential requests (one kept-alive
connection) pass through it, after a warm-up; the total over the requests is divided by
their number. Two runs of the same code agree within 0.5%.

It counts instructions in user space only: system calls (each send and receive, the kernel's
loopback work) are not in it, so a lever that saves system calls (coalesced writes) shows
here as nothing; strace -c shows those. And the server runs about 50 times slower under
callgrind, so timers and timeouts see another world: read the counts, not the times.

Starts everything on 127.0.0.1 and stops it at the end: nginx (`/hello`, the upstream), a
redis-server, the demo IdP, and either the gateway (`gateway run`, one process, the session
store on Redis with the default session cache) or, with `--bare`, bench/bare_proxy.py.

    python bench/instructions.py                          # public, signed-in, 401 rows
    python bench/instructions.py --rows signed --cache-ttl 0s --requests 500
    python bench/instructions.py --bare                   # the bare aiohttp proxy

Compare two versions of the code by running it in each checkout. Needs valgrind, nginx and
redis-server (Debian packages): what is missing is installed first with .ci/apt-install.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from compare import (  # noqa: E402  (bench/compare.py)
    API_HEADERS,
    CLIENT_SECRET,
    GATEWAY_COOKIE,
    LOGIN_STARTS_PER_MINUTE,
    _gateway_login,
    _serve_idp,
)
from conftest import free_port, raw_config, wait_until_ready  # noqa: E402
from real_upstreams import start_nginx_site  # noqa: E402
from redis_servers import start_plain  # noqa: E402

NEEDED = {"valgrind": "valgrind", "/usr/sbin/nginx": "nginx", "redis-server": "redis-server"}
WARM_UP = 30  # requests per row before counting starts


def _control(*args: str) -> None:
    control = shutil.which("callgrind_control") or "callgrind_control"
    subprocess.run([control, *args], check=True, capture_output=True)  # noqa: S603


def _total(path: Path) -> int:
    """The instructions a callgrind dump counted (its `totals:` line)."""
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


async def _count(server: asyncio.subprocess.Process, dumps: Path, name: str, url: str,
                 headers: dict[str, str], requests: int) -> float:
    """Instructions per request of `requests` GETs of `url`, one after another."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:

        async def get() -> None:
            async with http.get(url, headers=headers, allow_redirects=False) as resp:
                await resp.read()

        for _ in range(WARM_UP):
            await get()
        _control("--zero", str(server.pid))
        _control("--instr=on", str(server.pid))
        for _ in range(requests):
            await get()
        _control("--instr=off", str(server.pid))
        _control(f"--dump={name}", str(server.pid))
    newest = max(dumps.parent.glob(dumps.name + "*"), key=lambda p: p.stat().st_mtime)
    return _total(newest) / requests


async def _run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    nginx_port, idp_port, ws_port, port = (free_port() for _ in range(4))
    upstream = f"http://127.0.0.1:{nginx_port}"
    site = f"""server {{
    listen 127.0.0.1:{nginx_port};
    access_log off;
    location / {{ return 200 "hello, world\\n"; }}
}}"""
    nginx = await asyncio.to_thread(start_nginx_site, work, nginx_port, site)
    redis_server = start_plain(work)
    url, idp = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{idp_port}"
    idp_process = multiprocessing.get_context("spawn").Process(
        target=_serve_idp, daemon=True,
        args=(idp_port, (url + "/oauth2/callback",), "http://127.0.0.1:1/unused", ws_port))
    idp_process.start()
    server = None
    try:
        await wait_until_ready(idp + "/.well-known/openid-configuration")
        if args.bare:
            command = [str(ROOT / "bench" / "bare_proxy.py"), "--listen", f"127.0.0.1:{port}",
                       "--upstream", upstream]
            ready = url + "/hello"
        else:
            config = raw_config(url, idp, upstream, store=redis_server.url, routes=[
                {"name": "public", "path_prefix": "/public", "auth": "public",
                 "strip_prefix": True},
                {"name": "app", "path_prefix": "/"}],
                server={"login_starts_per_minute": LOGIN_STARTS_PER_MINUTE},
                session={"cache_ttl": args.cache_ttl})
            (work / "gateway.yaml").write_text(yaml.safe_dump(config))
            command = ["-m", "gateway", "run", "--config", str(work / "gateway.yaml")]
            ready = url + "/oauth2/readyz"
        dumps = work / "callgrind.out"
        server = await asyncio.create_subprocess_exec(
            shutil.which("valgrind") or "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={dumps}.%p", sys.executable, *command,
            env={**os.environ, "SECRET": CLIENT_SECRET, "PYTHONHASHSEED": "0"}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_until_ready(ready, attempts=1200)  # about 50 times slower to start
        targets = {"bare": (url + "/hello", {})} if args.bare else {}
        if not args.bare:
            cookie = await _gateway_login(url)
            targets = {
                "public": (url + "/public/hello", {}),
                "signed": (url + "/hello", {"Cookie": f"{GATEWAY_COOKIE}={cookie}"}),
                "api": (url + "/hello", API_HEADERS),
            }
        rows = list(targets) if args.bare else args.rows
        return {name: await _count(server, dumps, name, *targets[name], args.requests)
                for name in rows}
    finally:
        if server is not None:
            server.terminate()
            await server.wait()
        idp_process.terminate()
        redis_server.stop()
        await asyncio.to_thread(nginx.stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="counted per row")
    parser.add_argument("--rows", type=lambda v: v.split(","), default=["public", "signed", "api"],
                        help="of public, signed (a session cookie), api (a 401)")
    parser.add_argument("--cache-ttl", default="2s", help="session.cache_ttl (0s: off)")
    parser.add_argument("--bare", action="store_true", help="bench/bare_proxy.py instead")
    args = parser.parse_args()
    missing = [package for path, package in NEEDED.items()
               if not (os.path.exists(path) or shutil.which(path))]
    if missing:
        subprocess.run([str(ROOT / ".ci" / "apt-install"), *missing], check=True)  # noqa: S603
    with tempfile.TemporaryDirectory() as work:
        counts = asyncio.run(_run(args, Path(work)))
    for name, count in counts.items():
        print(f"{name:8s} {count / 1000:8.1f} k instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
