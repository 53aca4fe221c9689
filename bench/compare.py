"""The gateway side by side with Apache httpd + mod_auth_openidc, on one machine, one command.

Starts everything on 127.0.0.1 and stops it at the end:
- nginx (Debian's) serving a small static body at /hello, and a sparse file for the download:
  the one upstream of every row;
- a redis-server of its own: the session store of both proxies;
- the demo IdP, in a process of its own, with a client for each proxy, and beside it the demo
  upstream's WebSocket echo (the idle WebSockets row);
- the gateway, as `gateway run`, three times: the configuration under test (--workers,
  --cache-ttl, by default the gateway's own 2s, Redis), one worker on Redis without the
  session cache, and one worker on the memory store;
- a bare aiohttp proxy with no auth (bench/bare_proxy.py), as many processes as workers;
- Apache httpd 2.4 (event MPM) with mod_auth_openidc (Debian's libapache2-mod-auth-openidc),
  its session cache in the same Redis, proxying to the same nginx.
Each proxy gets a real signed-in session through the IdP; then wrk (2 threads, --connections,
--seconds per run) loads each row --runs times, and the median run (by req/s) is reported with
what the server under test spent in it: CPU per 1,000 requests, Redis commands per request and
peak memory. Then full sign-ins per second through each proxy (an aiohttp client driving the
authorization code flow), the scale rows (the signed-in row with 10,000 and 100,000 sessions in
Redis, and Redis memory per session), the gateway's memory with --websockets idle WebSockets
open, and a --download-mb download through the gateway. The tables go to stdout and to
bench/results/latest.md. Every server and the load share the cores: compare rows of one run
only.

    python bench/compare.py --workers 2
    python bench/compare.py --workers 1 --cache-ttl 0s --seconds 10 --runs 3
    python bench/compare.py --quick          # 1 s per row, small scale rows (CI)

Needs nginx, apache2-bin, libapache2-mod-auth-openidc, redis-server and wrk (Debian
packages): what is missing is installed first with .ci/apt-install, as .ci/run does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import resource
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import procstat  # noqa: E402  (bench/procstat.py)
import wrk  # noqa: E402  (bench/wrk.py)
from bulk_sessions import Population  # noqa: E402  (bench/bulk_sessions.py)
from conftest import (  # noqa: E402
    BROWSER_HEADERS,
    CLIENT_ID,
    CLIENT_SECRET,
    free_port,
    idp_sign_in,
    login,
    raw_config,
    serve,
    start_gateway,
    wait_until_ready,
)
from real_upstreams import APACHE, APACHE_MODULES, start_nginx_site  # noqa: E402
from redis_servers import start_plain  # noqa: E402

from gateway import config as gateway_config  # noqa: E402
from gateway.demo.idp import SESSION_COOKIE as IDP_COOKIE  # noqa: E402
from gateway.demo.idp import DemoClient, create_idp_app  # noqa: E402
from gateway.demo.upstream import create_upstream_app  # noqa: E402

APACHE_CLIENT, APACHE_SECRET = "apache-bench", "apache-secret-" + "a" * 32
MOD_AUTH_OPENIDC = f"{APACHE_MODULES}/mod_auth_openidc.so"
NEEDED = {
    "/usr/sbin/nginx": "nginx",
    APACHE: "apache2-bin",
    MOD_AUTH_OPENIDC: "libapache2-mod-auth-openidc",
    "redis-server": "redis-server",
    "wrk": "wrk",
}
API_HEADERS = {"Accept": "application/json", "X-Requested-With": "XMLHttpRequest"}
GATEWAY_COOKIE, APACHE_COOKIE = "gateway_session", "mod_auth_openidc_session"
MIB = 2**20
# Sign-in starts are counted (one Redis round trip each, as in production) but never refused:
# the 302 row and the sign-in loop start far more than the default 120 a minute.
LOGIN_STARTS_PER_MINUTE = 1_000_000_000

# What --quick sets, unless given: a proof that every row works, not a measurement.
QUICK = {
    "seconds": 1,
    "runs": 1,
    "connections": 8,
    "login_concurrency": 4,
    "sessions": [1000],
    "websockets": 50,
    "download_mb": 50,
}
DEFAULTS = {
    "seconds": 8,
    "runs": 3,
    "connections": 50,
    "login_concurrency": 8,
    "sessions": [10_000, 100_000],
    "websockets": 5000,
    "download_mb": 1024,
}


def _missing() -> list[str]:
    return [
        package
        for path, package in NEEDED.items()
        if not (os.path.exists(path) or shutil.which(path))
    ]


def _serve_idp(
    port: int, gateway_callbacks: tuple[str, ...], apache_callback: str, upstream_port: int
) -> None:
    """The demo IdP, and the demo upstream (its WebSocket echo), in a process of their own
    (the target of a child process)."""

    async def run() -> None:
        issuer = f"http://127.0.0.1:{port}"
        clients = [
            DemoClient(CLIENT_ID, CLIENT_SECRET, gateway_callbacks),
            DemoClient(APACHE_CLIENT, APACHE_SECRET, (apache_callback,)),
        ]
        await serve(create_idp_app(issuer, clients), port)
        await serve(create_upstream_app(), upstream_port)
        await asyncio.Event().wait()

    asyncio.run(run())


def _apache_conf(base: Path, port: int, idp: str, upstream: str, redis_port: int) -> str:
    modules = "\n".join(
        f"LoadModule {name}_module {APACHE_MODULES}/mod_{name}.so"
        for name in (
            "mpm_event",
            "authn_core",
            "authz_core",
            "authz_user",
            "proxy",
            "proxy_http",
            "auth_openidc",
        )
    )
    user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
    return f"""ServerRoot "{base}"
ServerName 127.0.0.1
{modules}
{user}PidFile "{base}/httpd.pid"
DefaultRuntimeDir "{base}"
ErrorLog "{base}/error.log"
LogLevel warn
Listen 127.0.0.1:{port}
# mpm_event as Debian ships it, for 2 cores
StartServers 2
ServerLimit 16
ThreadsPerChild 25
MaxRequestWorkers 400
KeepAlive On
MaxKeepAliveRequests 0

OIDCProviderMetadataURL {idp}/.well-known/openid-configuration
OIDCClientID {APACHE_CLIENT}
OIDCClientSecret {APACHE_SECRET}
OIDCRedirectURI http://127.0.0.1:{port}/redirect_uri
OIDCCryptoPassphrase {secrets.token_hex(32)}
OIDCScope "openid email profile"
OIDCPKCEMethod S256
OIDCCacheType redis
OIDCRedisCacheServer 127.0.0.1:{redis_port}
OIDCSessionInactivityTimeout 1800
OIDCProviderTokenEndpointAuth client_secret_basic

ProxyPass /public/ {upstream}/
ProxyPass /redirect_uri !
ProxyPass / {upstream}/
<Location />
    AuthType openid-connect
    Require valid-user
</Location>
<Location /public/>
    AuthType None
    Require all granted
</Location>
"""


@dataclass
class Apache:
    process: subprocess.Popen[bytes]
    base: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _start_apache(workdir: Path, port: int, idp: str, upstream: str, redis_port: int) -> Apache:
    base = Path(tempfile.mkdtemp(prefix="apache-bench-", dir=workdir))
    base.chmod(0o755)  # its children run as nobody
    (base / "httpd.conf").write_text(_apache_conf(base, port, idp, upstream, redis_port))
    process = subprocess.Popen(  # noqa: S603  (our own arguments, no shell)
        [APACHE, "-f", str(base / "httpd.conf"), "-DFOREGROUND"],
        cwd=base,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    return Apache(process, base)


def _start_bare_proxy(port: int, upstream: str | None, processes: int) -> subprocess.Popen[bytes]:
    """bench/bare_proxy.py: a proxy to `upstream`, or (None) an app answering 401."""
    return subprocess.Popen(  # noqa: S603  (our own script and arguments)
        [
            sys.executable,
            str(ROOT / "bench" / "bare_proxy.py"),
            "--listen",
            f"127.0.0.1:{port}",
            *(["--upstream", upstream] if upstream else ["--answer-401"]),
            "--processes",
            str(processes),
        ],
        stdout=subprocess.DEVNULL,
    )


async def _apache_login(http: aiohttp.ClientSession, apache: str) -> str:
    """A real sign-in through mod_auth_openidc and the demo IdP: its session cookie."""
    async with http.get(apache + "/hello", allow_redirects=False) as resp:
        assert resp.status == 302, f"Apache did not send to sign in: {resp.status}"
        authorize = resp.headers["Location"]
    callback = await idp_sign_in(http, authorize, "alice")
    async with http.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302, f"Apache refused the callback: {resp.status}"
    cookies = {c.key: c.value for c in http.cookie_jar}
    name = next(key for key in cookies if key.startswith(APACHE_COOKIE))
    return f"{name}={cookies[name]}"


async def _gateway_login(gateway: str) -> str:
    """A real sign-in through the gateway (a browser of its own): the session cookie."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar, headers=BROWSER_HEADERS) as http:
        await login(http, gateway, "/hello")
    return next(c.value for c in jar if c.key == GATEWAY_COOKIE)


# --- what a measurement costs the server under test ---------------------------------------


class RedisStats:
    """Commands Redis has processed (INFO stats), less those of this reader itself."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        first = self._total()
        self._own = self._total() - first  # what one reading adds (its own INFO)

    def _total(self) -> int:
        return int(self._client.info("stats")["total_commands_processed"])

    def mark(self) -> int:
        return self._total()

    def since(self, mark: int) -> int:
        return self._total() - mark - self._own

    def used_memory(self) -> int:
        return int(self._client.info("memory")["used_memory"])

    def close(self) -> None:
        self._client.close()


@dataclass
class Cost:
    cpu: float = 0.0  # seconds of CPU, the whole process tree
    redis: int = 0  # commands Redis processed
    peak: procstat.Memory = field(default_factory=lambda: procstat.Memory(0, 0))


@contextlib.contextmanager
def metered(roots: Sequence[int], stats: RedisStats) -> Iterator[Cost]:
    cost = Cost()
    mark = stats.mark()
    with procstat.Usage(roots) as usage:
        yield cost
    cost.redis = stats.since(mark)
    cost.cpu, cost.peak = usage.cpu, usage.peak


@dataclass
class Row:
    name: str
    rate: float  # requests (sign-ins, MB) per second
    p50: float  # ms
    p99: float
    cpu_ms: float  # CPU of the server under test, ms per 1,000 requests (per sign-in, per GB)
    redis: float  # Redis commands per request (per sign-in)
    rss_mb: float  # its peak memory, summed over its processes
    pss_mb: float
    extra: dict[str, float] = field(default_factory=dict)


def _median(runs: list[Row]) -> Row:
    return sorted(runs, key=lambda row: row.rate)[len(runs) // 2]


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: Mapping[str, str]
    root: int  # the pid whose process tree serves it
    status: int = 200  # wrk counts 4xx as errors: a 401 row expects them all


def _wrk_row(target: Target, stats: RedisStats, args: argparse.Namespace) -> Row:
    runs = []
    for _ in range(args.runs):
        with metered([target.root], stats) as cost:
            result = wrk.run(target.url, target.headers, args.seconds, args.connections)
        if target.status < 400 and result.non_2xx:
            raise SystemExit(f"{target.name}: {result.non_2xx} responses were not 2xx/3xx")
        if target.status >= 400 and result.non_2xx < 0.99 * result.total:
            raise SystemExit(
                f"{target.name}: only {result.non_2xx} of {result.total} "
                f"answers were errors, not {target.status}"
            )
        runs.append(
            Row(
                target.name,
                result.rate,
                result.p50,
                result.p99,
                cost.cpu * 1e6 / result.total,
                cost.redis / result.total,
                cost.peak.rss / MIB,
                cost.peak.pss / MIB,
            )
        )
    return _median(runs)


async def _check(url: str, headers: Mapping[str, str], status: int) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers=headers, allow_redirects=False) as resp,
    ):
        assert resp.status == status, f"{url}: {resp.status}, not {status}"


async def _measure(target: Target, stats: RedisStats, args: argparse.Namespace) -> Row:
    await _check(target.url, target.headers, target.status)
    row = await asyncio.to_thread(_wrk_row, target, stats, args)
    print(f"{row.name:<62} {row.rate:>9.0f} req/s", file=sys.stderr)
    return row


# --- sign-ins --------------------------------------------------------------------------------


async def _sign_in(http: aiohttp.ClientSession, start: str, cookie: str) -> tuple[float, float]:
    """One whole authorization code flow, the IdP remembering the user (single sign-on): the
    proxy's redirect to the IdP, the IdP's redirect back, the proxy's callback (code exchange,
    ID token checks, the new session). Its time, and the callback's alone."""
    began = time.perf_counter()
    async with http.get(start, allow_redirects=False) as resp:
        assert resp.status == 302, f"{start}: {resp.status}, not a redirect to sign in"
        authorize = resp.headers["Location"]
    callback = await idp_sign_in(http, authorize, "alice")
    called = time.perf_counter()
    async with http.get(callback, allow_redirects=False) as resp:
        await resp.read()
        assert resp.status == 302, f"callback: {resp.status}"
        assert any(name.startswith(cookie) for name in resp.cookies), "no session cookie"
    done = time.perf_counter()
    http.cookie_jar.clear(lambda morsel: morsel.key != IDP_COOKIE)  # signed out, not at the IdP
    return done - began, done - called


async def _browse(
    http: aiohttp.ClientSession,
    start: str,
    cookie: str,
    deadline: float,
    flows: list[float],
    callbacks: list[float],
) -> None:
    """One browser signing in again and again until `deadline` (time.monotonic)."""
    while time.monotonic() < deadline:
        flow, callback = await _sign_in(http, start, cookie)
        flows.append(flow)
        callbacks.append(callback)


async def _sign_ins(
    name: str, start: str, cookie: str, root: int, stats: RedisStats, args: argparse.Namespace
) -> Row:
    runs = []
    for _ in range(args.runs):
        browsers = [
            aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True), headers=BROWSER_HEADERS
            )
            for _ in range(args.login_concurrency)
        ]
        try:
            # Each browser signs in at the IdP once, outside the measurement.
            await asyncio.gather(*(_sign_in(http, start, cookie) for http in browsers))
            flows: list[float] = []
            callbacks: list[float] = []
            deadline = time.monotonic() + args.seconds

            with metered([root], stats) as cost:
                began = time.perf_counter()
                await asyncio.gather(
                    *(_browse(http, start, cookie, deadline, flows, callbacks) for http in browsers)
                )
                elapsed = time.perf_counter() - began
        finally:
            for http in browsers:
                await http.close()
        flows_ms = sorted(x * 1000 for x in flows)
        runs.append(
            Row(
                name,
                len(flows) / elapsed,
                _quantile(flows_ms, 0.5),
                _quantile(flows_ms, 0.99),
                cost.cpu * 1000 / len(flows),
                cost.redis / len(flows),
                cost.peak.rss / MIB,
                cost.peak.pss / MIB,
                {"callback_p50": statistics.median(callbacks) * 1000},
            )
        )
    row = _median(runs)
    print(f"{row.name:<62} {row.rate:>9.1f} sign-ins/s", file=sys.stderr)
    return row


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- a big download --------------------------------------------------------------------------


def _download(port: int, path: str, cookie: str, size: int) -> float:
    """GET `path` on a socket of our own and read it to the end, discarding it: the seconds
    it took. The cheapest reader there is, so the server under test is what is measured."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        began = time.perf_counter()
        cookie_line = f"Cookie: {cookie}\r\n" if cookie else ""
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n"
            f"{cookie_line}Connection: close\r\n\r\n".encode()
        )
        buffer = bytearray(MIB)
        head = b""
        while b"\r\n\r\n" not in head:
            count = sock.recv_into(buffer)
            if not count:
                raise RuntimeError(f"no answer to GET {path}: {head[:200]!r}")
            head += bytes(buffer[:count])
        head, _, body = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].split()[1] == "200", lines[0]
        length = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        assert length.get("content-length") == str(size), f"not {size} bytes: {lines}"
        received = len(body)
        while received < size:
            count = sock.recv_into(buffer)
            if not count:
                break
            received += count
        elapsed = time.perf_counter() - began
    if received != size:
        raise RuntimeError(f"GET {path}: {received} bytes of {size}")
    return elapsed


def _sparse_file(path: Path, size: int) -> None:
    """A file of `size` zeros that takes no disk, read once so that its pages are in the page
    cache before the first download (or the first row would pay for filling it)."""
    with open(path, "wb") as big:
        big.truncate(size)
    buffer = bytearray(MIB)
    with open(path, "rb") as big:
        while big.readinto(buffer):
            pass


def _download_row(
    name: str, port: int, cookie: str, root: int, stats: RedisStats, args: argparse.Namespace
) -> Row:
    size = args.download_mb * MIB
    runs = []
    for _ in range(args.runs):
        before = procstat.tree_memory([root])
        with metered([root], stats) as cost:
            seconds = _download(port, "/big.bin", cookie, size)
        runs.append(
            Row(
                name,
                size / MIB / seconds,
                0,
                0,
                cost.cpu * 1000 / (size / 2**30),
                cost.redis,
                cost.peak.rss / MIB,
                cost.peak.pss / MIB,
                {
                    "seconds": seconds,
                    "rss_before": before.rss / MIB,
                    "growth": (cost.peak.rss - before.rss) / MIB,
                },
            )
        )
    row = _median(runs)
    print(f"{row.name:<62} {row.rate:>9.0f} MB/s", file=sys.stderr)
    return row


# --- idle WebSockets -------------------------------------------------------------------------


@dataclass
class Sockets:
    count: int
    total_before: float  # MB, the gateway's processes summed (a supervisor too)
    total: float
    worker_before: float  # MB, the largest serving process (worker) before they opened
    worker: float  # and with them open
    workers: int


def _serving(rss: dict[int, int], root: int) -> list[int]:
    """The serving processes' resident sets: the workers, or the process itself."""
    workers = [value for pid, value in rss.items() if pid != root]
    return workers or list(rss.values())


async def _websockets(gateway: str, cookie: str, count: int, root: int) -> Sockets:
    """`count` WebSockets through the gateway to the upstream's echo, each answered once and
    then left idle; the gateway's memory before and with them open."""
    await asyncio.sleep(1)
    before = procstat.rss_by_process(root)
    opening = asyncio.Semaphore(100)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def open_one(number: int) -> None:
            async with opening:
                ws = await http.ws_connect(gateway + "/ws", headers={"Cookie": cookie})
                sockets.append(ws)
                await ws.send_str(f"hello {number}")
                answer = await ws.receive(timeout=30)
                assert answer.data == f"echo:hello {number}", answer

        try:
            await asyncio.gather(*(open_one(number) for number in range(count)))
            await asyncio.sleep(2)  # idle
            after = procstat.rss_by_process(root)
            probe = sockets[0]
            await probe.send_str("still there")
            assert (await probe.receive(timeout=30)).data == "echo:still there"
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    result = Sockets(
        count,
        sum(before.values()) / MIB,
        sum(after.values()) / MIB,
        max(_serving(before, root)) / MIB,
        max(_serving(after, root)) / MIB,
        len(_serving(after, root)),
    )
    print(
        f"{count} idle WebSockets: gateway RSS {result.total:.0f} MB "
        f"(largest worker {result.worker:.0f} MB)",
        file=sys.stderr,
    )
    return result


# --- the scale rows --------------------------------------------------------------------------


@dataclass
class Scale:
    rows: list[tuple[int, Row]]  # sessions in Redis, the signed-in row
    bytes_per_session: float
    keys_per_session: float


async def _scale(
    target: Target,
    population: Population,
    template: str,
    stats: RedisStats,
    args: argparse.Namespace,
) -> Scale:
    memory_before = stats.used_memory()
    rows = [(await population.count(), await _measure(target, stats, args))]
    for wanted in args.sessions:
        began = time.perf_counter()
        adding = max(0, wanted - await population.count())
        await population.add(adding, template)
        print(
            f"{adding:,} sessions written in {time.perf_counter() - began:.1f} s",
            file=sys.stderr,
        )
        live = await population.count()
        rows.append((live, await _measure(target, stats, args)))
    per_session = (stats.used_memory() - memory_before) / max(1, population.added)
    buckets = {index for index, _ in population.members}  # index buckets: shared
    keys = (len(population.keys) + len(buckets)) / max(1, population.added)
    await population.remove()
    return Scale(rows, per_session, keys)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    rows: dict[str, Row]
    sign_ins: list[Row]
    downloads: list[Row]
    scale: Scale
    sockets: Sockets
    names: Names


@dataclass(frozen=True)
class Names:
    """The rows' names, which say the configuration they ran."""

    workers: int
    cache_ttl: str

    @property
    def headline(self) -> str:
        cache = f"cache_ttl {self.cache_ttl}" if _seconds(self.cache_ttl) else "no cache"
        return f"gateway, signed in, Redis, {_plural(self.workers, 'worker')}, {cache}"

    @property
    def bare(self) -> str:
        return f"bare aiohttp proxy, no auth, {_plural(self.workers, 'process', 'es')}"

    @property
    def bare_401(self) -> str:
        return f"bare aiohttp app, a fixed 401, {_plural(self.workers, 'process', 'es')}"

    redis_one = "gateway, signed in, Redis, 1 worker, no cache"
    memory_one = "gateway, signed in, memory store, 1 worker"
    upstream = "nginx upstream direct"
    public = "gateway, public route"
    apache_public = "Apache, no auth"
    apache = "Apache + mod_auth_openidc, signed in"
    browser = "gateway, browser request, no session (302)"
    apache_browser = "Apache + mod_auth_openidc, browser request, no session (302)"
    api = "gateway, API request, no session (401)"
    apache_api = "Apache + mod_auth_openidc, API request, no session (401)"
    sign_in = "gateway, full sign-in"
    apache_sign_in = "Apache + mod_auth_openidc, full sign-in"

    def order(self) -> list[str]:
        """The request rows in table order (the headline is the Redis one-worker row when
        the configuration under test is that one)."""
        names = [
            self.upstream,
            self.bare,
            self.public,
            self.apache_public,
            self.memory_one,
            self.redis_one,
            self.headline,
            self.apache,
            self.browser,
            self.apache_browser,
            self.api,
            self.apache_api,
            self.bare_401,
        ]
        return list(dict.fromkeys(names))


def _plural(count: int, noun: str, suffix: str = "s") -> str:
    return f"{count} {noun}{'' if count == 1 else suffix}"


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for unit, factor in units.items():
        if duration.endswith(unit) and duration[: -len(unit)].replace(".", "").isdigit():
            return float(duration[: -len(unit)]) * factor
    return float(duration)


def _worker_count(workers: str) -> int:
    return len(os.sched_getaffinity(0)) if workers == "auto" else int(workers)


async def _run(args: argparse.Namespace, workdir: Path) -> Results:
    names = Names(_worker_count(args.workers), args.cache_ttl)
    ports = [free_port() for _ in range(9)]
    nginx_port, idp_port, ws_port, ap_port, bare_port, bare_401_port, *gw_ports = ports
    upstream = f"http://127.0.0.1:{nginx_port}"
    apache_url, bare = f"http://127.0.0.1:{ap_port}", f"http://127.0.0.1:{bare_port}"
    bare_401 = f"http://127.0.0.1:{bare_401_port}"
    gw_main, gw_redis, gw_memory = (f"http://127.0.0.1:{port}" for port in gw_ports)
    idp = f"http://127.0.0.1:{idp_port}"
    www = workdir / "www"
    www.mkdir()
    www.chmod(0o755)
    await asyncio.to_thread(_sparse_file, www / "big.bin", args.download_mb * MIB)
    site = f"""server {{
    listen 127.0.0.1:{nginx_port};
    access_log off;
    location / {{ return 200 "hello, world\\n"; }}
    location = /big.bin {{ root {www}; sendfile on; }}
}}"""
    nginx = await asyncio.to_thread(start_nginx_site, workdir, nginx_port, site)
    redis_server = start_plain(workdir)
    redis_port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    idp_process = multiprocessing.get_context("spawn").Process(
        target=_serve_idp,
        daemon=True,
        args=(
            idp_port,
            tuple(url + "/oauth2/callback" for url in (gw_main, gw_redis, gw_memory)),
            apache_url + "/redirect_uri",
            ws_port,
        ),
    )
    idp_process.start()
    stats = RedisStats(redis_server.url)
    apache = bare_proxy = bare_401_app = None
    gateways: list[asyncio.subprocess.Process] = []
    population = None
    try:
        await wait_until_ready(idp + "/.well-known/openid-configuration")
        env = {**os.environ, "SECRET": CLIENT_SECRET}

        def config(url: str, store: str, workers: Any, cache_ttl: str) -> dict[str, Any]:
            return raw_config(
                url,
                idp,
                upstream,
                store=store,
                routes=[
                    {
                        "name": "public",
                        "path_prefix": "/public",
                        "auth": "public",
                        "strip_prefix": True,
                    },
                    {"name": "ws", "path_prefix": "/ws", "upstream": f"http://127.0.0.1:{ws_port}"},
                    {"name": "app", "path_prefix": "/"},
                ],
                server={"workers": workers, "login_starts_per_minute": LOGIN_STARTS_PER_MINUTE},
                session={"cache_ttl": cache_ttl},
            )

        configs = {
            gw_main: config(gw_main, redis_server.url, args.workers, args.cache_ttl),
            gw_redis: config(gw_redis, redis_server.url, 1, "0s"),
            gw_memory: config(gw_memory, "memory://", 1, "0s"),
        }
        pids = {}
        for index, (url, raw) in enumerate(configs.items()):
            gateways.append(await start_gateway(raw, workdir / f"gateway-{index}.yaml", env=env))
            pids[url] = gateways[-1].pid
        apache = _start_apache(workdir, ap_port, idp, upstream, redis_port)
        bare_proxy = _start_bare_proxy(bare_port, upstream, names.workers)
        bare_401_app = _start_bare_proxy(bare_401_port, None, names.workers)
        for url in configs:
            await wait_until_ready(url + "/oauth2/readyz")
        await wait_until_ready(apache_url + "/public/hello")
        await wait_until_ready(bare + "/hello")
        await wait_until_ready(bare_401 + "/oauth2/readyz", status=401)
        cookies = {url: await _gateway_login(url) for url in configs}
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=BROWSER_HEADERS
        ) as http:
            ap_cookie = await _apache_login(http, apache_url)

        def signed_in(url: str) -> dict[str, str]:
            return {"Cookie": f"{GATEWAY_COOKIE}={cookies[url]}"}

        main, ap = pids[gw_main], apache.process.pid
        targets = [
            Target(names.upstream, upstream + "/hello", {}, nginx.process.pid),
            Target(names.bare, bare + "/hello", {}, bare_proxy.pid),
            Target(names.public, gw_main + "/public/hello", {}, main),
            Target(names.apache_public, apache_url + "/public/hello", {}, ap),
            Target(names.memory_one, gw_memory + "/hello", signed_in(gw_memory), pids[gw_memory]),
            Target(names.redis_one, gw_redis + "/hello", signed_in(gw_redis), pids[gw_redis]),
            Target(names.headline, gw_main + "/hello", signed_in(gw_main), main),
            Target(names.apache, apache_url + "/hello", {"Cookie": ap_cookie}, ap),
            Target(names.api, gw_main + "/hello", API_HEADERS, main, 401),
            Target(names.apache_api, apache_url + "/hello", API_HEADERS, ap, 401),
            Target(names.bare_401, bare_401 + "/hello", API_HEADERS, bare_401_app.pid, 401),
        ]
        rows = {}
        for target in targets:
            if target.name not in rows:
                rows[target.name] = await _measure(target, stats, args)
        # The scale rows come before anything that leaves records in Redis (the 302 rows
        # write a login attempt each), so Redis memory per session is the sessions' alone.
        population = Population(gateway_config.parse(configs[gw_redis], {"SECRET": CLIENT_SECRET}))
        scale_target = Target(
            names.redis_one, gw_redis + "/hello", signed_in(gw_redis), pids[gw_redis]
        )
        scale = await _scale(scale_target, population, cookies[gw_redis], stats, args)
        for target in (
            Target(names.browser, gw_main + "/hello", BROWSER_HEADERS, main, 302),
            Target(names.apache_browser, apache_url + "/hello", BROWSER_HEADERS, ap, 302),
        ):
            rows[target.name] = await _measure(target, stats, args)
        sign_ins = [
            await _sign_ins(names.sign_in, gw_main + "/hello", GATEWAY_COOKIE, main, stats, args),
            await _sign_ins(
                names.apache_sign_in, apache_url + "/hello", APACHE_COOKIE, ap, stats, args
            ),
        ]
        sockets = await _websockets(gw_main, signed_in(gw_main)["Cookie"], args.websockets, main)
        size = (
            f"{args.download_mb / 1024:g} GB"
            if args.download_mb >= 1024
            else f"{args.download_mb} MB"
        )
        downloads = [
            await asyncio.to_thread(
                _download_row,
                f"nginx direct, {size} download",
                nginx_port,
                "",
                nginx.process.pid,
                stats,
                args,
            ),
            await asyncio.to_thread(
                _download_row,
                f"gateway, signed in, {size} download",
                gw_ports[0],
                signed_in(gw_main)["Cookie"],
                main,
                stats,
                args,
            ),
        ]
        return Results(rows, sign_ins, downloads, scale, sockets, names)
    finally:
        if population is not None:
            await population.aclose()
        for gateway in gateways:
            if gateway.returncode is None:
                gateway.terminate()
                await gateway.wait()
        for bare_server in (bare_proxy, bare_401_app):
            if bare_server is not None:
                bare_server.terminate()
                bare_server.wait()
        if apache is not None:
            apache.stop()
        idp_process.terminate()
        stats.close()
        redis_server.stop()
        await asyncio.to_thread(nginx.stop)


# --- the tables ------------------------------------------------------------------------------


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _table(results: Results, args: argparse.Namespace) -> str:
    names, by = results.names, results.rows
    head, apache = by[names.headline], by[names.apache]

    def ratio(a: str, b: str) -> str:
        return f"{by[a].rate / by[b].rate:.2f}x"

    gw_in, ap_in = results.sign_ins
    sockets, scale = results.sockets, results.scale
    lines = [
        f"Machine: {os.cpu_count()} CPUs, {_cpu_model()}, {platform.system()} "
        f"{platform.release()}; {time.strftime('%Y-%m-%d')}",
        f"Command: {shlex.join(['python', 'bench/compare.py', *sys.argv[1:]])}",
        f"Load: wrk -t2 -c{args.connections}, {args.seconds} s per run, median of "
        f"{args.runs} runs (by req/s); CPU, Redis and memory are those of the median run.",
        "",
        "| row | req/s | p50 ms | p99 ms | CPU ms / 1,000 req | Redis cmds / req "
        "| peak RSS MB | peak PSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r.name} | {_n(r.rate)} | {r.p50:.2f} | {r.p99:.2f} | {_n(r.cpu_ms)} "
            f"| {r.redis:.2f} | {_n(r.rss_mb)} | {_n(r.pss_mb)} |"
            for r in (by[name] for name in names.order())
        ),
        "",
        f"Full sign-ins: {args.login_concurrency} browsers in a loop for {args.seconds} s "
        "(aiohttp; the IdP remembers the user, so each is three requests: the proxy's redirect, "
        "the IdP's, the callback); CPU and Redis per sign-in.",
        "",
        "| sign-in | sign-ins/s | p50 ms | p99 ms | callback p50 ms | CPU ms / sign-in "
        "| Redis cmds / sign-in | peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r.name} | {_n(r.rate, 1)} | {r.p50:.1f} | {r.p99:.1f} "
            f"| {r.extra['callback_p50']:.1f} | {r.cpu_ms:.2f} | {r.redis:.2f} | {_n(r.rss_mb)} |"
            for r in results.sign_ins
        ),
        "",
        "| download | MB/s | seconds | CPU s / GB | RSS before MB | peak RSS MB | RSS growth MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r.name} | {_n(r.rate)} | {r.extra['seconds']:.2f} | {r.cpu_ms / 1000:.2f} "
            f"| {_n(r.extra['rss_before'])} | {_n(r.rss_mb)} | {_n(r.extra['growth'], 1)} |"
            for r in results.downloads
        ),
        "",
        f"Scale: `{names.redis_one}` with more sessions in Redis (real ones, sealed and "
        "indexed by the gateway's store code, a user each).",
        "",
        "| sessions in Redis | req/s | p50 ms | p99 ms | CPU ms / 1,000 req | Redis cmds / req |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {_n(count)} | {_n(r.rate)} | {r.p50:.2f} | {r.p99:.2f} | {_n(r.cpu_ms)} "
            f"| {r.redis:.2f} |"
            for count, r in scale.rows
        ),
        "",
        f"- Redis memory per session: {_n(scale.bytes_per_session)} bytes "
        f"({scale.keys_per_session:.1f} keys each: the sealed record, its registry entry, "
        "and the index buckets its members went to, which other sessions share)",
        f"- gateway RSS with {_n(sockets.count)} idle WebSockets: the largest of "
        f"{_plural(sockets.workers, 'worker')} {_n(sockets.worker)} MB "
        f"({_n(sockets.worker_before)} MB before them, "
        f"{(sockets.total - sockets.total_before) * 1024 / sockets.count:.1f} KB per "
        f"WebSocket); all its processes {_n(sockets.total)} MB "
        f"({_n(sockets.total_before)} MB before)",
        f"- sessions {_n(scale.rows[-1][0])} ÷ {_n(scale.rows[0][0])}: "
        f"{scale.rows[-1][1].rate / scale.rows[0][1].rate:.2f}x",
        "",
        f"- gateway ÷ Apache + mod_auth_openidc, signed in: "
        f"**{ratio(names.headline, names.apache)}** "
        f"(p99 {head.p99:.1f} ms vs {apache.p99:.1f} ms; CPU per request "
        f"{head.cpu_ms / apache.cpu_ms:.2f}x)",
        f"- gateway signed in ÷ gateway public route: {ratio(names.headline, names.public)}",
        f"- gateway signed in ÷ bare aiohttp proxy: {ratio(names.headline, names.bare)}",
        f"- gateway ÷ Apache, unauthenticated API request (401): "
        f"{ratio(names.api, names.apache_api)} (a bare aiohttp app answering every request "
        f"with that 401 and doing nothing else: {ratio(names.bare_401, names.apache_api)})",
        f"- gateway ÷ Apache, unauthenticated browser request (302): "
        f"{ratio(names.browser, names.apache_browser)}",
        f"- gateway ÷ Apache, full sign-ins per second: {gw_in.rate / ap_in.rate:.2f}x",
    ]
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _raise_open_files() -> None:
    """Thousands of WebSockets take as many descriptors, here and in the gateway (which
    inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1")
    parser.add_argument("--cache-ttl", default="2s")  # session.cache_ttl's default
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 s per row, one run, small scale rows: proves it works",
    )
    parser.add_argument("--seconds", type=int)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--connections", type=int)
    parser.add_argument("--login-concurrency", type=int, help="browsers signing in at once")
    parser.add_argument(
        "--sessions",
        type=lambda v: [int(n) for n in v.split(",")],
        help="scale rows: sessions in Redis, e.g. 10000,100000",
    )
    parser.add_argument("--websockets", type=int, help="idle WebSockets held open")
    parser.add_argument("--download-mb", type=int, help="size of the download, MiB")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.md")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.workers != "auto":
        args.workers = int(args.workers)
    if _missing():
        apt_install = [str(ROOT / ".ci" / "apt-install"), *_missing()]
        subprocess.run(apt_install, check=True)  # noqa: S603  (our own script, package names)
    _raise_open_files()
    with tempfile.TemporaryDirectory() as workdir:
        results = asyncio.run(_run(args, Path(workdir)))
    table = _table(results, args)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
