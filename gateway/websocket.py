"""WebSockets: the upgrade handshake, and the watch over every open socket.

The handshake is passed through, as nginx passes it: the upstream gets the client's own
Sec-WebSocket-Key, version, subprotocols and extensions (with the identity headers, after the
same session and policy checks as any request), and decides. An answer other than 101 goes
back to the client as any response does (proxy.py). A 101 is checked (Upgrade: websocket, the
accept value the client's key calls for, a subprotocol the client offered) before the client
gets it; then both connections are handed to a byte relay (wsrelay.py) and the handler
returns. A 101 that fails the checks is a 502: the gateway never tunnels a connection it did
not see upgraded to a WebSocket.

One watch per process (SocketWatch) looks after every open socket, every WS_RECHECK_INTERVAL
seconds:
- a socket whose session ended (sign-out, back-channel logout, admin revoke, or idle expiry)
  is closed with 1008; the check asks the store whether the sessions exist, all of them in
  one round trip, and does not count as use (it never slides a session's idle timeout);
- a socket opened with a bearer token is closed with 1008 once the gateway would no longer
  take the token (its `exp` plus oidc.clock_skew, on the gateway's clock): a token is
  checked when it is presented, and a socket would otherwise outlive it for as long as it
  stayed open;
- a socket that carried no data frame either way for its route's websocket_idle_timeout is
  closed with 1001.
On shutdown every open socket is closed with 1001 (going away).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import WS_KEY
from multidict import CIMultiDict

from gateway.errors import GatewayError, UpstreamError, WebSocketHandshakeError
from gateway.routing import Route
from gateway.wsrelay import Relay

log = logging.getLogger("gateway.websocket")

WS_RECHECK_INTERVAL = 2.0  # seconds; bounds how long a revoked session keeps a socket
# 1008 (policy violation): the session or bearer token it was opened with has ended.
_SESSION_ENDED, _GOING_AWAY = 1008, 1001
# The client's handshake fields the upstream gets as they came (RFC 6455 §4.1, §9).
_OFFER = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol",
          "Sec-WebSocket-Extensions")
# The upstream's 101 fields the client gets; nothing else of that answer is passed on.
_ANSWER = ("Sec-WebSocket-Accept", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions")

Alive = Callable[[Collection[str]], Awaitable[Collection[str]]]


class SocketWatch:
    """Every open socket of this process, and the one task that watches them."""

    def __init__(self, alive: Alive, interval: float = WS_RECHECK_INTERVAL, *,
                 clock: Callable[[], float] = time.time,
                 counted: Callable[[int], None] | None = None) -> None:
        self._alive = alive  # which of these sessions still exist (one store round trip)
        self._clock = clock  # the gateway's: what bearer tokens' expiry is read against
        self._interval = interval
        self._counted = counted  # told how many are open after each change (the metrics)
        self._sockets: set[Relay] = set()
        self._task: asyncio.Task[None] | None = None
        self._emptied: asyncio.Event | None = None  # set when the last socket ends (shutdown)

    def __len__(self) -> int:
        return len(self._sockets)

    def add(self, socket: Relay) -> None:
        """A socket just handed to its relay. During shutdown it is told at once that the
        gateway is going away."""
        self._sockets.add(socket)
        self._changed()
        if self._emptied is not None:
            socket.close(_GOING_AWAY, b"server shutdown")
        elif self._task is None or self._task.done():
            self._task = asyncio.create_task(self._watch())

    def discard(self, socket: Relay) -> None:
        """The relay calls this when both of its connections are gone."""
        self._sockets.discard(socket)
        self._changed()
        if not self._sockets and self._emptied is not None:
            self._emptied.set()

    def _changed(self) -> None:
        if self._counted is not None:
            self._counted(len(self._sockets))

    async def close_all(self, within: float = 10.0) -> None:
        """on_shutdown: tell every client we are going away (1001), so they reconnect, and
        wait (at most `within` seconds) for the sockets to end."""
        self._emptied = asyncio.Event()
        for socket in list(self._sockets):
            socket.close(_GOING_AWAY, b"server shutdown")
        if self._sockets:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._emptied.wait()
        for socket in list(self._sockets):  # still not answered: cut
            socket.cut()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._sockets:
            await asyncio.sleep(self._interval)
            now = loop.time()
            wall = self._clock()
            for socket in list(self._sockets):
                if not socket.closing and socket.idle_timeout is not None and \
                        socket.quiet_for(now) >= socket.idle_timeout:
                    log.info("websocket_closed_idle route=%s id=%s", socket.route,
                             socket.request_id)
                    socket.close(_GOING_AWAY, b"idle")
                elif not socket.closing and socket.expires_at is not None and \
                        wall >= socket.expires_at:
                    log.info("websocket_closed_token_expired route=%s id=%s", socket.route,
                             socket.request_id)
                    socket.close(_SESSION_ENDED, b"token expired")
            sessions = {s.session for s in self._sockets
                        if s.session is not None and not s.closing}
            if not sessions:
                continue
            try:
                alive = await self._alive(sessions)
            except GatewayError as exc:  # store down: keep the sockets, check again next time
                log.warning("websocket_session_check_failed detail=%s", exc.detail)
                continue
            for socket in list(self._sockets):
                if socket.session is not None and socket.session not in alive \
                        and not socket.closing:
                    log.info("websocket_closed_session_ended route=%s id=%s", socket.route,
                             socket.request_id)
                    socket.close(_SESSION_ENDED, b"session ended")


def offer(request: web.Request, upstream_headers: CIMultiDict[str]) -> None:
    """Check the client's opening handshake (RFC 6455 §4.2.1) and ask the upstream for the
    upgrade with the client's own key, version, subprotocols and extensions."""
    if request.body_exists:  # its bytes would reach the upstream unscanned, before the frames
        raise WebSocketHandshakeError("websocket: an opening handshake has no body")
    keys = request.headers.getall("Sec-WebSocket-Key", [])
    if len(keys) != 1 or not _is_key(keys[0]):
        raise WebSocketHandshakeError("websocket: Sec-WebSocket-Key must be one base64 "
                                      "16-byte nonce")
    if request.headers.get("Sec-WebSocket-Version", "").strip() != "13":
        raise WebSocketHandshakeError("websocket: Sec-WebSocket-Version must be 13")
    for name in _OFFER:
        upstream_headers.popall(name, None)
        for value in request.headers.getall(name, []):
            upstream_headers.add(name, value)
    upstream_headers["Upgrade"] = "websocket"
    upstream_headers["Connection"] = "Upgrade"


def _is_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except binascii.Error:
        return False


async def accept(request: web.Request, upstream: aiohttp.ClientResponse, watch: SocketWatch,
                 route: Route, *, session: str | None, request_id: str | None,
                 expires_at: float | None = None) -> web.StreamResponse:
    """The upstream answered 101: check it, send the client its 101, and relay the socket
    from now on, `session` (its storage id) watched for its end, and a bearer token's
    `expires_at` for its passing; `request_id` names the handshake's request in the
    socket's log lines."""
    answer = upstream.headers
    key = request.headers["Sec-WebSocket-Key"].strip()
    # RFC 6455 §4.2.2: SHA-1 here is the protocol's fixed proof of a WebSocket server, not
    # a security hash.
    digest = hashlib.sha1(key.encode() + WS_KEY, usedforsecurity=False).digest()
    expected = base64.b64encode(digest).decode()
    connection = {t.strip().lower() for t in answer.get("Connection", "").split(",")}
    if answer.get("Upgrade", "").lower() != "websocket" or "upgrade" not in connection \
            or answer.get("Sec-WebSocket-Accept", "").strip() != expected:
        raise UpstreamError(f"route {route.name}: the upstream's 101 is not a WebSocket "
                            "upgrade for this request")
    offered = {p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", [])
               for p in v.split(",")}
    chosen = answer.get("Sec-WebSocket-Protocol")
    if chosen is not None and chosen.strip() not in offered:
        raise UpstreamError(f"route {route.name}: the upstream chose a WebSocket subprotocol "
                            "the client did not offer")
    response = web.StreamResponse(status=101, headers={"Upgrade": "websocket",
                                                       "Connection": "Upgrade"})
    for name in _ANSWER:
        for value in answer.getall(name, []):
            response.headers.add(name, value)
    response.force_close()
    try:
        await response.prepare(request)
    except ConnectionError:  # the client left before its 101
        log.info("client_went_away route=%s", route.name)
        upstream.close()
        return response
    client_transport, upstream_transport = request.transport, upstream.connection and \
        upstream.connection.transport
    if client_transport is None or upstream_transport is None:  # one of them left meanwhile
        log.info("websocket_lost_at_handshake route=%s", route.name)
        upstream.close()
        if client_transport is not None:
            client_transport.close()
        return response
    options = route.config
    relay = Relay(client_transport, upstream_transport, route=route.name,
                  request_id=request_id, session=session,
                  idle_timeout=options.websocket_idle_timeout, expires_at=expires_at,
                  ping_interval=options.websocket_ping_interval,
                  close_timeout=options.read_timeout, ended=watch.discard)
    client_tail = _release_server(request)
    upstream_tail = _release_client(upstream)
    relay.start(client_tail, upstream_tail)
    watch.add(relay)
    return response


class _Tail:
    """Stands in for aiohttp's WebSocket reader at the handover, to take what an end sent
    after the handshake that aiohttp had already read."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def feed_data(self, data: bytes) -> tuple[bool, int]:
        self.data += data
        return False, 0

    def feed_eof(self) -> None:
        pass


def _release_server(request: web.Request) -> bytes:
    """aiohttp's server lets go of the client's connection (RFC 6455 §4.2.2: it is the
    socket's now). Once the handler's task is done the server is told the connection is
    gone, which drops it from its list of connections."""
    protocol: Any = request.protocol
    tail = _let_go(protocol)
    task = asyncio.current_task()
    assert task is not None
    task.add_done_callback(lambda _: protocol.connection_lost(None))
    return tail


def _release_client(upstream: aiohttp.ClientResponse) -> bytes:
    """aiohttp's client lets go of the upstream's connection; the connector counts it closed
    and never pools it."""
    connection = upstream.connection
    assert connection is not None
    tail = _let_go(connection.protocol, None)  # (its set_parser also takes a payload queue)
    upstream.close()
    return tail


def _let_go(protocol: Any, *parser_args: None) -> bytes:
    """What an aiohttp protocol read past the handshake (taken through set_parser, as its
    own WebSocket reader would be given it); then it no longer closes or writes the
    transport."""
    tail = _Tail()
    protocol.set_parser(tail, *parser_args)
    protocol.transport = None
    return tail.data
