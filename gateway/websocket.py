"""Proxy an upgraded WebSocket both ways, for as long as its session lives.

Frames (text, binary, ping, pong) and close codes pass through unchanged. On a protected
route the session is re-checked every WS_RECHECK_INTERVAL seconds: a session revoked anywhere
(sign-out, back-channel logout, admin) closes its sockets with 1008. On shutdown every open
socket is closed with 1001 (going away). aiohttp errors are translated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import GatewayError, UpstreamError, UpstreamTimeoutError
from gateway.routing import Route
from gateway.runtime import Runtime
from gateway.upstreams import Upstream

log = logging.getLogger("gateway.websocket")

WS_RECHECK_INTERVAL = 2.0  # seconds; bounds how long a revoked session keeps a socket
_HANDSHAKE = ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
              "sec-websocket-protocol", "sec-websocket-accept")


async def forward(request: web.Request, rt: Runtime, route: Route, upstream_to: Upstream,
                  url: URL,
                  upstream_headers: CIMultiDict[str], *,
                  watch_session: bool) -> web.StreamResponse:
    for name in _HANDSHAKE:
        upstream_headers.popall(name, None)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                 if p.strip()]
    try:
        upstream = await upstream_to.session.ws_connect(
            url, headers=upstream_headers, protocols=protocols, autoping=False, ssl=upstream_to.ssl,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=route.read_timeout),
        )
    except TimeoutError as exc:
        raise UpstreamTimeoutError(f"route {route.name}: websocket {url.with_query(None)} "
                                   "handshake timed out") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"route {route.name}: websocket {url.with_query(None)}: "
                            f"{type(exc).__name__}") from exc
    async with upstream:
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (), autoping=False)
        await client.prepare(request)
        rt.websockets.add(client)
        watcher = None
        if watch_session:
            cookie = request.cookies.get(rt.session_cookie, "")
            watcher = asyncio.create_task(_close_when_revoked(rt, cookie, client))
        try:
            await _pump_both_ways(client, upstream)
        finally:
            rt.websockets.discard(client)
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
    return client


async def _close_when_revoked(rt: Runtime, cookie: str, client: web.WebSocketResponse) -> None:
    while not client.closed:
        await asyncio.sleep(WS_RECHECK_INTERVAL)
        try:
            session = await rt.sessions.load(cookie)
        except GatewayError as exc:  # store down: keep the socket, check again next time
            log.warning("websocket_session_check_failed detail=%s", exc.detail)
            continue
        if session is None:
            log.info("websocket_closed_session_revoked")
            await client.close(code=WSCloseCode.POLICY_VIOLATION, message=b"session ended")
            return


async def close_all(rt: Runtime) -> None:
    """on_shutdown: tell every client we are going away (1001), so they reconnect elsewhere."""
    for client in list(rt.websockets):
        await client.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")


async def _pump_both_ways(client: web.WebSocketResponse,
                          upstream: aiohttp.ClientWebSocketResponse) -> None:
    to_upstream = asyncio.create_task(_pump(client, upstream))
    to_client = asyncio.create_task(_pump(upstream, client))
    done, pending = await asyncio.wait({to_upstream, to_client},
                                       return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    code = next(iter(done)).result()
    await client.close(code=code)
    await upstream.close(code=code)


async def _pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> int:
    """Relay frames until one side closes; returns the close code to pass on."""
    async for message in source:
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
