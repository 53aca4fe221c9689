"""Proxy an upgraded WebSocket both ways, for as long as its session lives.

Frames (text, binary, ping, pong) and close codes pass through unchanged. One watch per
process (SocketWatch) looks after every open socket, every WS_RECHECK_INTERVAL seconds:
- a socket whose session ended (sign-out, back-channel logout, admin revoke, or idle expiry)
  is closed with 1008; the check asks the store whether the sessions exist, all of them in
  one round trip, and does not count as use (it never slides a session's idle timeout);
- a socket that carried no frame either way for its route's websocket_idle_timeout is closed
  with 1001.
Half-open clients are found by pings: the gateway pings the client every
websocket_ping_interval and closes a socket whose pong does not come. On shutdown every open
socket is closed with 1001 (going away). aiohttp errors are translated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import GatewayError, UpstreamError, UpstreamTimeoutError
from gateway.routing import Route

log = logging.getLogger("gateway.websocket")

WS_RECHECK_INTERVAL = 2.0  # seconds; bounds how long a revoked session keeps a socket
_HANDSHAKE = ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
              "sec-websocket-protocol", "sec-websocket-accept")

Alive = Callable[[Collection[str]], Awaitable[Collection[str]]]


@dataclass(eq=False)
class _Socket:
    client: web.WebSocketResponse
    session: str | None  # the session's storage id; None on a public route
    idle_timeout: float | None
    last_frame: float = field(default_factory=lambda: asyncio.get_running_loop().time())


class SocketWatch:
    """Every open client socket of this process, and the one task that watches them."""

    def __init__(self, alive: Alive, interval: float = WS_RECHECK_INTERVAL, *,
                 counted: Callable[[int], None] | None = None) -> None:
        self._alive = alive  # which of these sessions still exist (one store round trip)
        self._interval = interval
        self._counted = counted  # told how many are open after each change (the metrics)
        self._sockets: set[_Socket] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[bool]] = set()

    def __len__(self) -> int:
        return len(self._sockets)

    def add(self, socket: _Socket) -> None:
        self._sockets.add(socket)
        self._changed()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch())

    def discard(self, socket: _Socket) -> None:
        self._sockets.discard(socket)
        self._changed()

    def _changed(self) -> None:
        if self._counted is not None:
            self._counted(len(self._sockets))

    async def close_all(self) -> None:
        """on_shutdown: tell every client we are going away (1001), so they reconnect."""
        for socket in list(self._sockets):
            await socket.client.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._sockets:
            await asyncio.sleep(self._interval)
            now = loop.time()
            for socket in list(self._sockets):
                if socket.idle_timeout is not None and \
                        now - socket.last_frame >= socket.idle_timeout:
                    log.info("websocket_closed_idle")
                    self._close(socket, WSCloseCode.GOING_AWAY, b"idle")
            sessions = {s.session for s in self._sockets if s.session is not None}
            if not sessions:
                continue
            try:
                alive = await self._alive(sessions)
            except GatewayError as exc:  # store down: keep the sockets, check again next time
                log.warning("websocket_session_check_failed detail=%s", exc.detail)
                continue
            for socket in list(self._sockets):
                if socket.session is not None and socket.session not in alive:
                    log.info("websocket_closed_session_ended")
                    self._close(socket, WSCloseCode.POLICY_VIOLATION, b"session ended")

    def _close(self, socket: _Socket, code: int, message: bytes) -> None:
        """Closing waits for the client's close frame: not in the watch's own loop."""
        self.discard(socket)
        task = asyncio.create_task(socket.client.close(code=code, message=message))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def forward(request: web.Request, watch: SocketWatch, route: Route,
                  url: URL, upstream_headers: CIMultiDict[str], *,
                  session: str | None) -> web.StreamResponse:
    """Proxy the socket; `session` (its storage id) is watched for its end."""
    for name in _HANDSHAKE:
        upstream_headers.popall(name, None)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                 if p.strip()]
    try:
        upstream = await route.upstream.session.ws_connect(
            url, headers=upstream_headers, protocols=protocols, autoping=False,
            ssl=route.upstream.ssl,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=route.config.read_timeout),
        )
    except TimeoutError as exc:
        raise UpstreamTimeoutError(f"route {route.name}: websocket {url.with_query(None)} "
                                   "handshake timed out") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"route {route.name}: websocket {url.with_query(None)}: "
                            f"{type(exc).__name__}") from exc
    async with upstream:
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (), autoping=False,
            heartbeat=route.config.websocket_ping_interval or None)
        await client.prepare(request)
        socket = _Socket(client, session, route.config.websocket_idle_timeout)
        watch.add(socket)
        try:
            await _pump_both_ways(socket, upstream)
        finally:
            watch.discard(socket)
    return client


async def _pump_both_ways(socket: _Socket, upstream: aiohttp.ClientWebSocketResponse) -> None:
    client = socket.client
    to_upstream = asyncio.create_task(_pump(client, upstream, socket))
    to_client = asyncio.create_task(_pump(upstream, client, socket))
    done, pending = await asyncio.wait({to_upstream, to_client},
                                       return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    code = next(iter(done)).result()
    await client.close(code=code)
    await upstream.close(code=code)


async def _pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                socket: _Socket) -> int:
    """Relay frames until one side closes; returns the close code to pass on."""
    loop = asyncio.get_running_loop()
    async for message in source:
        socket.last_frame = loop.time()
        if message.type == WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type == WSMsgType.PONG:
            await sink.pong(message.data)
    code = source.close_code or 1000
    # 1005/1006/1015 describe a missing close frame and must never be sent (RFC 6455 §7.4.1).
    return code if 1000 <= code < 5000 and code not in (1005, 1006, 1015) else 1000
