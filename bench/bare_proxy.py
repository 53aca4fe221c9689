"""The Python ceiling: a bare aiohttp reverse proxy with no auth at all.

What the gateway would cost with nothing of its own on the request path: the same aiohttp
server (gateway.server's runner and parser limits, no access log), the same pooled upstream
client settings as gateway.upstreams (no cookies, no decompression, idle connections dropped
after 4 s), and a handler that forwards the method, path and headers (hop-by-hop ones
dropped) and streams the answer back, on uvloop as `server.event_loop`'s default
(`--event-loop asyncio`: the standard library's). `--processes N` serves one port from N
processes with SO_REUSEPORT, as `server.workers: N` does, under a parent that only waits and
passes SIGTERM on.

    python bench/bare_proxy.py --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8081
    python bench/bare_proxy.py --listen 127.0.0.1:8080 --upstream http://127.0.0.1:8081 \
        --processes 2
    python bench/bare_proxy.py --listen 127.0.0.1:8080 --answer-401 --processes 2

With `--answer-401` there is no upstream: every request gets the gateway's 401 for an API
client (its headers and JSON body), with nothing else done. The floor of the 401 row: what
any gateway on aiohttp's server could do at best.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import pages
from gateway.errors import NotAuthenticatedError
from gateway.headers import HOP_BY_HOP
from gateway.server import SERVER_HEADER, GatewayRunner, handler_args
from gateway.upstreams import KEEPALIVE_TIMEOUT

_CHUNK = 64 * 1024
_SKIP_AUTO = ("Accept-Encoding", "User-Agent", "Content-Type", "Accept")


def _forwardable(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() != "host"
    }


def create_app(upstream: str) -> web.Application:
    client: list[aiohttp.ClientSession] = []

    async def pool(app: web.Application) -> AsyncIterator[None]:
        client.append(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_TIMEOUT
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        )
        yield
        await client[0].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = request.content if request.body_exists else None
        async with client[0].request(
            request.method,
            upstream + request.raw_path,
            headers=_forwardable(request.headers),
            data=body,
            allow_redirects=False,
            skip_auto_headers=_SKIP_AUTO,
        ) as answer:
            response = web.StreamResponse(
                status=answer.status, reason=answer.reason, headers=_forwardable(answer.headers)
            )
            if answer.content_length is not None:
                response.content_length = answer.content_length
            try:
                await response.prepare(request)
                async for chunk in answer.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:  # the client left (wrk, at the end of a run)
                pass
            return response

    app = web.Application(handler_args=handler_args(16 * 1024))
    app.cleanup_ctx.append(pool)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def create_401_app() -> web.Application:
    """Every request answered as the gateway answers an API client without a session (its
    headers and JSON body, encoded once), and nothing else done: the floor of the 401 row."""

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(
            status=401,
            headers=_401_HEADERS,
            body=_401_BODY,
            content_type="application/json",
            charset="utf-8",
        )

    app = web.Application(handler_args=handler_args(16 * 1024))
    app.router.add_route("*", "/{tail:.*}", refuse)
    return app


# The gateway's own: its error pages' headers and Server name, and the body pages.render
# makes for a NotAuthenticatedError (an API client's 401 on a route without bearer tokens).
_401_HEADERS = {**pages._PAGE_HEADERS, "Server": SERVER_HEADER}
_401_BODY = pages._json_body(NotAuthenticatedError.event, NotAuthenticatedError.public_message, ())


async def serve(listen: str, upstream: str | None) -> None:
    host, _, port = listen.rpartition(":")
    app = create_app(upstream.rstrip("/")) if upstream else create_401_app()
    runner = GatewayRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, int(port), reuse_port=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--upstream", help="http://HOST:PORT")
    mode.add_argument(
        "--answer-401", action="store_true", help="no upstream: answer every request 401"
    )
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.processes == 1:
        run = uvloop.run if args.event_loop == "uvloop" else asyncio.run
        run(serve(args.listen, args.upstream))
        return 0
    children = [
        subprocess.Popen(  # noqa: S603  (this very script, our own arguments)
            [sys.executable, __file__, "--listen", args.listen, "--event-loop", args.event_loop,
             *(["--upstream", args.upstream] if args.upstream else ["--answer-401"])]
        )
        for _ in range(args.processes)
    ]

    def stop(signum: int, frame: object) -> None:
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return max(child.wait() for child in children)


if __name__ == "__main__":
    sys.exit(main())
