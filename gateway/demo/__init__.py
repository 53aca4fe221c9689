"""Self-contained demo: development IdP, sample upstream, gateway.

`gateway demo` needs no config and no network: everything binds to 127.0.0.1, the client
secret is random per run, and sessions live in memory. Nothing but cli imports this package.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
import sys

from aiohttp import web

from gateway import config as config_module
from gateway import observability
from gateway.app import build_app
from gateway.demo.idp import DEMO_USERS, DemoClient, create_idp_app
from gateway.demo.upstream import create_upstream_app
from gateway.server import GatewayRunner

_HOST = "127.0.0.1"


def _bound_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((_HOST, port))
    return sock


def demo_config(gateway_port: int, idp_url: str, upstream_url: str,
                secret: str) -> config_module.Config:
    public_url = f"http://{_HOST}:{gateway_port}"
    raw = {
        "server": {"listen": f"{_HOST}:{gateway_port}", "public_url": public_url},
        "oidc": {"issuer": idp_url, "client_id": "gateway-demo",
                 "client_secret": "${DEMO_CLIENT_SECRET}",
                 "scopes": ["openid", "email", "profile", "groups"]},
        "session": {"store": "memory://", "cookie_secure": False},
        "routes": [
            {"name": "admin", "path_prefix": "/admin", "upstream": upstream_url,
             "allow": {"groups": ["admins"]}},
            {"name": "public", "path_prefix": "/public", "upstream": upstream_url,
             "auth": "public"},
            {"name": "app", "path_prefix": "/", "upstream": upstream_url},
        ],
    }
    return config_module.parse(raw, {"DEMO_CLIENT_SECRET": secret})


async def _start(app: web.Application, sock: socket.socket,
                 runner_class: type[web.AppRunner] = web.AppRunner) -> web.AppRunner:
    runner = runner_class(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


async def _serve(port: int) -> None:
    gateway_sock = _bound_socket(port)
    idp_sock, upstream_sock = _bound_socket(0), _bound_socket(0)
    idp_url = f"http://{_HOST}:{idp_sock.getsockname()[1]}"
    upstream_url = f"http://{_HOST}:{upstream_sock.getsockname()[1]}"
    secret = secrets.token_urlsafe(32)
    config = demo_config(port, idp_url, upstream_url, secret)
    client = DemoClient("gateway-demo", secret, (config.redirect_uri,),
                        (config.server.public_url + "/oauth2/signed_out",))
    runners = [await _start(create_idp_app(idp_url, [client]), idp_sock),
               await _start(create_upstream_app(), upstream_sock)]
    runners.append(await _start(build_app(config), gateway_sock, GatewayRunner))
    users = ", ".join(f"{name}/{user.password}" for name, user in DEMO_USERS.items())
    print(f"gateway demo running: open {config.server.public_url}/ in a browser\n"
          f"  demo users (login/password): {users}; /admin is for group 'admins' only\n"
          f"  identity provider: {idp_url}   sample upstream: {upstream_url}\n"
          f"  press Ctrl-C to stop", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def run_demo(port: int = 4180) -> int:
    observability.setup(config_module.LoggingConfig())
    try:
        asyncio.run(_serve(port))
    except OSError as exc:
        print(f"demo could not start: {exc.strerror} (is port {port} in use? try --port)",
              file=sys.stderr)
        return 1
    return 0
