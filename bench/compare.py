"""The gateway side by side with Apache httpd + mod_auth_openidc, on one machine, one command.

Starts everything on 127.0.0.1 and stops it at the end:
- nginx (Debian's) serving a small static body at /hello: the one upstream of every row;
- a redis-server of its own: the session store of both proxies;
- the demo IdP, in a process of its own, with a client for each proxy;
- the gateway, as `gateway run` with --workers and --cache-ttl;
- Apache httpd 2.4 (event MPM) with mod_auth_openidc (Debian's libapache2-mod-auth-openidc),
  its session cache in the same Redis, proxying to the same nginx.
Each proxy gets one real signed-in session through the IdP; then wrk (2 threads,
--connections, --seconds per run) loads each row --runs times, and the median run is
reported. Rows: the upstream direct, each proxy without auth, each proxy signed in, and each
proxy's answer to an unauthenticated API request (401). The table goes to stdout and to
bench/results/latest.md. wrk, the proxies, nginx and Redis share the cores: compare rows of
one run only.

    python bench/compare.py --workers 2 --cache-ttl 1s
    python bench/compare.py --workers 1 --seconds 10 --runs 3

Needs nginx, apache2-bin, libapache2-mod-auth-openidc, redis-server and wrk (Debian
packages): what is missing is installed first with .ci/apt-install, as .ci/run does.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import wrk  # noqa: E402  (bench/wrk.py)
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

from gateway.demo.idp import DemoClient, create_idp_app  # noqa: E402

APACHE_CLIENT, APACHE_SECRET = "apache-bench", "apache-secret-" + "a" * 32
MOD_AUTH_OPENIDC = f"{APACHE_MODULES}/mod_auth_openidc.so"
NEEDED = {"/usr/sbin/nginx": "nginx", APACHE: "apache2-bin",
          MOD_AUTH_OPENIDC: "libapache2-mod-auth-openidc", "redis-server": "redis-server",
          "wrk": "wrk"}
API_HEADERS = {"Accept": "application/json", "X-Requested-With": "XMLHttpRequest"}


def _missing() -> list[str]:
    return [package for path, package in NEEDED.items()
            if not (os.path.exists(path) or shutil.which(path))]


def _serve_idp(port: int, redirect_uris: tuple[str, str]) -> None:
    """The demo IdP, in a process of its own (the target of a child process)."""
    async def run() -> None:
        issuer = f"http://127.0.0.1:{port}"
        clients = [DemoClient(CLIENT_ID, CLIENT_SECRET, (redirect_uris[0],)),
                   DemoClient(APACHE_CLIENT, APACHE_SECRET, (redirect_uris[1],))]
        await serve(create_idp_app(issuer, clients), port)
        await asyncio.Event().wait()

    asyncio.run(run())


def _apache_conf(base: Path, port: int, idp: str, upstream: str, redis_port: int) -> str:
    modules = "\n".join(
        f"LoadModule {name}_module {APACHE_MODULES}/mod_{name}.so"
        for name in ("mpm_event", "authn_core", "authz_core", "authz_user", "proxy",
                     "proxy_http", "auth_openidc"))
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
        [APACHE, "-f", str(base / "httpd.conf"), "-DFOREGROUND"], cwd=base,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"},
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return Apache(process, base)


async def _apache_login(http: aiohttp.ClientSession, apache: str) -> str:
    """A real sign-in through mod_auth_openidc and the demo IdP: its session cookie."""
    async with http.get(apache + "/hello", allow_redirects=False) as resp:
        assert resp.status == 302, f"Apache did not send to sign in: {resp.status}"
        authorize = resp.headers["Location"]
    callback = await idp_sign_in(http, authorize, "alice")
    async with http.get(callback, allow_redirects=False) as resp:
        assert resp.status == 302, f"Apache refused the callback: {resp.status}"
    cookies = {c.key: c.value for c in http.cookie_jar}
    name = next(key for key in cookies if key.startswith("mod_auth_openidc_session"))
    return f"{name}={cookies[name]}"


@dataclass
class Row:
    name: str
    rate: float
    p50: float
    p99: float
    expected_status: int  # wrk counts 4xx as errors: a 401 row expects them all


def _median_row(name: str, url: str, headers: dict[str, str], args: argparse.Namespace,
                status: int = 200) -> Row:
    runs = []
    for _ in range(args.runs):
        result = wrk.run(url, headers, args.seconds, args.connections)
        if status < 400 and result.non_2xx:
            raise SystemExit(f"{name}: {result.non_2xx} responses were not 2xx/3xx")
        runs.append((result.rate, result.p50, result.p99))
    rate, p50, p99 = sorted(runs)[len(runs) // 2]
    return Row(name, rate, p50, p99, status)


async def _check(url: str, headers: dict[str, str], status: int) -> None:
    async with aiohttp.ClientSession() as http, \
            http.get(url, headers=headers, allow_redirects=False) as resp:
        assert resp.status == status, f"{url}: {resp.status}, not {status}"


async def _run(args: argparse.Namespace, workdir: Path) -> list[Row]:
    nginx_port, idp_port, gw_port, ap_port = (free_port() for _ in range(4))
    upstream = f"http://127.0.0.1:{nginx_port}"
    gateway, apache_url = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{ap_port}"
    idp = f"http://127.0.0.1:{idp_port}"
    site = f"""server {{
    listen 127.0.0.1:{nginx_port};
    access_log off;
    location / {{ return 200 "hello, world\\n"; }}
}}"""
    nginx = await asyncio.to_thread(start_nginx_site, workdir, nginx_port, site)
    redis = start_plain(workdir)
    redis_port = int(redis.url.rsplit(":", 1)[1].split("/")[0])
    idp_process = multiprocessing.get_context("spawn").Process(
        target=_serve_idp, args=(idp_port, (gateway + "/oauth2/callback",
                                            apache_url + "/redirect_uri")), daemon=True)
    idp_process.start()
    apache = gateway_proc = None
    try:
        await wait_until_ready(idp + "/.well-known/openid-configuration")
        raw = raw_config(gateway, idp, upstream, store=redis.url, routes=[
            {"name": "public", "path_prefix": "/public", "auth": "public",
             "strip_prefix": True},
            {"name": "app", "path_prefix": "/"}],
            server={"workers": args.workers}, session={"cache_ttl": args.cache_ttl})
        gateway_proc = await start_gateway(raw, workdir / "gateway.yaml",
                                           env={**os.environ, "SECRET": CLIENT_SECRET})
        apache = _start_apache(workdir, ap_port, idp, upstream, redis_port)
        await wait_until_ready(gateway + "/oauth2/readyz")
        await wait_until_ready(apache_url + "/public/hello")
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar, headers=BROWSER_HEADERS) as http:
            await login(http, gateway, "/hello")
            session = next(c.value for c in jar if c.key == "gateway_session")
            gw_cookie = f"gateway_session={session}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                         headers=BROWSER_HEADERS) as http:
            ap_cookie = await _apache_login(http, apache_url)
        rows = [
            ("nginx upstream direct", upstream + "/hello", {}, 200),
            ("gateway, public route", gateway + "/public/hello", {}, 200),
            ("Apache, no auth", apache_url + "/public/hello", {}, 200),
            ("gateway, signed in", gateway + "/hello", {"Cookie": gw_cookie}, 200),
            ("Apache + mod_auth_openidc, signed in", apache_url + "/hello",
             {"Cookie": ap_cookie}, 200),
            ("gateway, API request, no session (401)", gateway + "/hello", API_HEADERS, 401),
            ("Apache + mod_auth_openidc, API request, no session (401)",
             apache_url + "/hello", API_HEADERS, 401),
        ]
        results = []
        for name, url, headers, status in rows:
            await _check(url, headers, status)
            results.append(await asyncio.to_thread(_median_row, name, url, headers, args,
                                                   status))
            print(f"{name:<58} {results[-1].rate:>9.0f} req/s", file=sys.stderr)
        return results
    finally:
        if gateway_proc is not None and gateway_proc.returncode is None:
            gateway_proc.terminate()
            await gateway_proc.wait()
        if apache is not None:
            apache.stop()
        idp_process.terminate()
        redis.stop()
        await asyncio.to_thread(nginx.stop)


def _table(rows: list[Row], args: argparse.Namespace) -> str:
    by = {row.name: row for row in rows}
    ratio = (by["gateway, signed in"].rate
             / by["Apache + mod_auth_openidc, signed in"].rate)
    ratio_401 = (by["gateway, API request, no session (401)"].rate
                 / by["Apache + mod_auth_openidc, API request, no session (401)"].rate)
    lines = [
        f"Machine: {os.cpu_count()} CPUs, {_cpu_model()}, {platform.system()} "
        f"{platform.release()}; {time.strftime('%Y-%m-%d')}",
        f"Command: python bench/compare.py --workers {args.workers} --cache-ttl "
        f"{args.cache_ttl} --seconds {args.seconds} --runs {args.runs} --connections "
        f"{args.connections} (wrk -t2, median of {args.runs} runs)",
        "",
        "| row | req/s | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {r.name} | {r.rate:,.0f} | {r.p50:.2f} | {r.p99:.2f} |" for r in rows),
        "",
        f"- gateway ÷ Apache + mod_auth_openidc, signed in: **{ratio:.2f}x** "
        f"(p99 {by['gateway, signed in'].p99:.1f} ms vs "
        f"{by['Apache + mod_auth_openidc, signed in'].p99:.1f} ms)",
        f"- gateway signed in ÷ gateway public route: "
        f"{by['gateway, signed in'].rate / by['gateway, public route'].rate:.2f}x",
        f"- gateway ÷ Apache, unauthenticated API request (401): {ratio_401:.2f}x",
    ]
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1")
    parser.add_argument("--cache-ttl", default="0s")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.md")
    args = parser.parse_args()
    args.workers = args.workers if args.workers == "auto" else int(args.workers)
    if _missing():
        subprocess.run([str(ROOT / ".ci" / "apt-install"), *_missing()],  # noqa: S603
                       check=True)
    with tempfile.TemporaryDirectory() as workdir:
        rows = asyncio.run(_run(args, Path(workdir)))
    table = _table(rows, args)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
