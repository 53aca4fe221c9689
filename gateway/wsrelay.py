"""Relay a WebSocket's bytes after the handshake, as they came: no frame is decoded or rebuilt.

After the 101 both connections leave aiohttp (websocket.py hands their transports over): what
one side sends is written to the other unchanged, so permessage-deflate, fragmented messages
and messages of any size pass as the two ends agreed them, with flow control (a side whose
writes back up stops the other side's reads). Per socket this keeps the two transports and
three small objects; aiohttp's objects for a proxied socket (the request and its handler task,
a reader, writer and timers for each end) took about 30 KB.

The relay still reads each frame's header (RFC 6455 §5.2), never its payload. That tells it
where a frame ends, which is the only place the gateway may put a frame of its own (a ping to
the client, a close to either side) without cutting one of theirs, and which frames carry
data (activity for websocket_idle_timeout; pings and pongs are not activity).

Closing, by whoever starts it:
- an end's close frame passes like any other; the upstream answers, then ends the TCP
  connection, and the relay ends the client's after what was written to it is sent;
- the gateway (the session ended: 1008; idle, shutdown: 1001) puts a close frame to each end
  at its next frame boundary, passes nothing more either way, ends each connection when
  that end answers with its own close, and cuts whatever is left after the route's
  read_timeout. The upstream's frame in flight is finished first (the app is trusted); the
  client's is not: if the client is inside a frame, the upstream's connection ends there;
- an end that leaves without a close frame (its connection reset or ended): the other end
  gets a close 1001 if it is between frames, then its connection ends too;
- a client that, within half of websocket_ping_interval after a ping went out, neither sent
  anything nor took more of what it was sent is cut (one the relay stopped reading, because
  the upstream is slow to take its bytes, is not judged).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

log = logging.getLogger("gateway.websocket")

_CLOSE, _PING = 0x8, 0x9
_PING_FRAME = bytes((0x80 | _PING, 0))  # FIN, ping, no payload, unmasked (server to client)
_DATA = (0x0, 0x1, 0x2)  # continuation, text, binary


def close_frame(code: int, reason: bytes, *, masked: bool) -> bytes:
    """A close frame (RFC 6455 §5.5.1). A client's frames are masked (§5.3): the gateway is
    the upstream's client. The mask is random, as §10.3 asks."""
    payload = code.to_bytes(2, "big") + reason[:123]
    if not masked:
        return bytes((0x80 | _CLOSE, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | _CLOSE, 0x80 | len(payload))) + key + \
        bytes(b ^ key[i & 3] for i, b in enumerate(payload))


class Frames:
    """Where the frames in one direction begin and end, from their headers alone."""

    __slots__ = ("_head", "_left", "_opcode", "closed", "data")

    def __init__(self) -> None:
        self._left = 0  # payload bytes of the current frame still to come
        self._head = b""  # the start of a header split across reads
        self._opcode = 0
        self.data = False  # a data frame (or a part of one) went by since last cleared
        self.closed = False  # a close frame began

    @property
    def between(self) -> bool:
        """At a frame boundary: a frame of the gateway's own may go here."""
        return not self._left and not self._head

    def scan(self, data: bytes, start: int = 0, *, first_end: bool = False) -> int:
        """Follow data[start:]; return where it stopped: len(data), or with first_end just
        after the first frame that ends in it (then `between` is true)."""
        end = len(data)
        i = start
        while i < end:
            if self._left:
                step = min(self._left, end - i)
                self._left -= step
                i += step
                if self._opcode in _DATA:
                    self.data = True
                if not self._left and first_end:
                    return i
                continue
            head = self._head + data[i:i + 14 - len(self._head)]
            if len(head) < 2:
                self._head, i = head, end
                continue
            size, masked = head[1] & 0x7F, head[1] & 0x80
            length = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if masked else 0)
            if len(head) < length:
                self._head, i = head, end
                continue
            if size == 126:
                size = int.from_bytes(head[2:4], "big")
            elif size == 127:
                size = int.from_bytes(head[2:10], "big")
            i += length - len(self._head)
            self._head = b""
            self._opcode = opcode = head[0] & 0x0F
            if opcode in _DATA:
                self.data = True
            elif opcode == _CLOSE:
                self.closed = True
            self._left = size
            if not size and first_end:
                return i
        return end


class _Side(asyncio.Protocol):
    """One end's connection: what it sends goes to the other end (`peer`)."""

    __slots__ = ("final", "frames", "gone", "masked", "peer", "pending", "received", "relay",
                 "sent", "shut", "transport")

    def __init__(self, relay: Relay, transport: asyncio.Transport, *, masked: bool) -> None:
        self.relay = relay
        self.transport = transport
        self.peer: _Side = self
        self.frames = Frames()  # of what this end sends
        self.masked = masked  # frames to this end are masked (it is the upstream)
        self.pending: bytes | None = None  # a frame of ours for this end, at the next boundary
        self.final = False  # the pending frame is our close: nothing follows it
        self.shut = False  # our close went to this end: nothing more is written to it
        self.gone = False  # its connection is lost
        self.sent = 0  # bytes this end sent
        self.received = 0  # bytes written to this end (some may wait in the transport)

    def data_received(self, data: bytes) -> None:
        self.sent += len(data)
        relay, peer, frames = self.relay, self.peer, self.frames
        if self is relay.client:
            relay.heard = True
        start = 0
        while peer.pending is not None and not peer.shut:  # ours goes at their next boundary
            stop = frames.scan(data, start, first_end=True)
            if stop > start:
                peer.write(data[start:stop])
            start = stop
            if not frames.between:  # no frame of theirs ended in this read
                return
            relay.send(peer)
        frames.scan(data, start)
        if frames.closed:  # the other end answers, the upstream ends the connection: or not
            relay.arm_deadline()
        if peer.shut:  # closing: nothing more goes to the peer; this end's close is awaited
            if frames.closed and self.shut:
                self.transport.close()
        elif start < len(data):
            peer.write(data[start:] if start else data)

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self.transport.write(data)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def pause_writing(self) -> None:
        if not self.peer.gone:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.gone:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.relay.lost(self)


class Relay:
    """One proxied WebSocket after its handshake: its two ends, and how it ends."""

    __slots__ = ("_close_timeout", "_deadline", "_ended", "_opened", "_ping_interval",
                 "_progress", "_quiet_since", "_timer", "client", "closing", "expires_at",
                 "heard", "idle_timeout",
                 "request_id", "route", "session", "upstream")

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport, *,
                 route: str, request_id: str | None, session: str | None,
                 idle_timeout: float | None, expires_at: float | None = None,
                 ping_interval: float, close_timeout: float,
                 ended: Callable[[Relay], None]) -> None:
        self.route = route  # its name and the handshake's request id, for the log lines
        self.request_id = request_id
        self.client = _Side(self, client, masked=False)
        self.upstream = _Side(self, upstream, masked=True)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.session = session  # the session's storage id; None on a public route
        self.expires_at = expires_at  # when the bearer token it was opened with expires
        self.idle_timeout = idle_timeout
        self.heard = True  # the client sent something since the last ping
        self.closing = False
        self._ping_interval = ping_interval
        self._close_timeout = close_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._progress = 0  # _delivered() when the client was last pinged or checked
        self._ended = ended
        self._opened = self._quiet_since = asyncio.get_running_loop().time()

    def start(self, client_tail: bytes, upstream_tail: bytes) -> None:
        """Take both transports over, with what each end sent before the handover."""
        for side in (self.client, self.upstream):
            side.transport.set_protocol(side)
            side.transport.resume_reading()
        for side, tail in ((self.client, client_tail), (self.upstream, upstream_tail)):
            if tail and not side.gone:
                side.data_received(tail)
        if self._ping_interval:
            self._timer = asyncio.get_running_loop().call_later(self._ping_interval, self._ping)

    def quiet_for(self, now: float) -> float:
        """How long no data frame went by either way (the watch asks every interval, so to
        within one)."""
        if self.client.frames.data or self.upstream.frames.data:
            self.client.frames.data = self.upstream.frames.data = False
            self._quiet_since = now
        return now - self._quiet_since

    def close(self, code: int, reason: bytes) -> None:
        """End the socket from here: a close frame to each end, at its next boundary. Not a
        byte more of the client's goes on: if it is inside a frame, the upstream's
        connection ends there without a close frame (waiting for that frame's end would let
        a revoked client stream on, one endless frame, until the close timeout)."""
        if self.closing:
            return
        self._begin_closing()
        client, upstream = self.client, self.upstream
        self._close_toward(client, close_frame(code, reason, masked=False))
        if not upstream.gone and not client.frames.between:  # the client is inside a frame
            upstream.pending, upstream.final, upstream.shut = None, True, True
            upstream.transport.close()
        else:
            self._close_toward(upstream, close_frame(code, reason, masked=True))
        self.arm_deadline()

    def _close_toward(self, side: _Side, frame: bytes) -> None:
        """Our close for `side`, unless it has the other end's whole close already."""
        if side.gone:
            return
        if side.peer.frames.closed and side.peer.frames.between:
            side.final = side.shut = True
        else:
            self.put(side, frame, final=True)

    def _begin_closing(self) -> None:
        self.closing = True
        self._cancel_timer()

    def arm_deadline(self) -> None:
        """A close is under way (ours, or an end's close frame): if the ends have not ended
        their connections by the close timeout, both are cut."""
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().call_later(self._close_timeout,
                                                                    self.cut)

    def put(self, side: _Side, frame: bytes, *, final: bool) -> None:
        """A frame of ours for `side`: now if the other end is between frames, or later."""
        if side.shut or side.final:  # nothing goes after our close
            return
        side.pending, side.final = frame, final
        if side.peer.frames.between:
            self.send(side)

    def send(self, side: _Side) -> None:
        frame, side.pending = side.pending, None
        if frame is not None and not side.gone:
            side.write(frame)
            if frame is _PING_FRAME:
                self._pinged()
        if side.final:
            side.shut = True
            if side.frames.closed:  # it had already sent its own close
                side.transport.close()

    def lost(self, side: _Side) -> None:
        """One end's connection is gone: the other's ends too, after what it was sent (cut
        if that is not sent within the close timeout: an end that stopped reading). If the
        end left without a close frame, the other gets one (1001) when it can. While the
        gateway closes the socket, an end that was sent its close ends when it answers."""
        side.shut, side.pending = True, None  # nothing more is written to it
        other = side.peer
        if other.gone:
            self._end()
            return
        if not self.closing:
            self._begin_closing()
            if not side.frames.closed and side.frames.between:
                other.write(close_frame(1001, b"", masked=other.masked))
            other.transport.close()
        elif not other.shut:  # our close could not go to it: the lost end was inside a frame
            other.transport.close()
        self.arm_deadline()

    def _ping(self) -> None:
        """Ping the client; the ping waits for the upstream's frame in flight to end."""
        self._timer = None
        if self.closing or self.client.gone:
            return
        self._progress = self._delivered()
        self.put(self.client, _PING_FRAME, final=False)
        if self.client.pending is not None:  # not sent yet: see that the client still reads
            self._timer = asyncio.get_running_loop().call_later(self._ping_interval / 2,
                                                                 self._pong)

    def _pinged(self) -> None:
        """The ping went out: the client has half the interval to send anything."""
        self.heard = False
        self._cancel_timer()
        self._progress = self._delivered()
        self._timer = asyncio.get_running_loop().call_later(self._ping_interval / 2, self._pong)

    def _pong(self) -> None:
        """A client is alive if it sent something since the ping, or took more of what it
        was sent (a ping behind a long frame to a slow reader), or could not be heard
        because the relay stopped reading it (the upstream is slow to take its bytes)."""
        self._timer = None
        if self.closing:
            return
        delivered = self._delivered()
        if not self.heard and delivered <= self._progress \
                and self.client.transport.is_reading():
            log.info("websocket_closed_unresponsive route=%s id=%s", self.route,
                     self.request_id)
            self.client.transport.abort()
            return
        self._progress = delivered
        if self.client.pending is not None:  # the ping still waits: check again
            self.heard = False
            self._timer = asyncio.get_running_loop().call_later(self._ping_interval / 2,
                                                                 self._pong)
        else:
            self._timer = asyncio.get_running_loop().call_later(self._ping_interval / 2,
                                                                 self._ping)

    def _delivered(self) -> int:
        """Bytes written to the client that left the relay's buffer for the kernel's."""
        return self.client.received - self.client.transport.get_write_buffer_size()

    def cut(self) -> None:
        """Abort whatever connection is left (the close timeout, or shutdown's end)."""
        self._deadline = None
        for side in (self.client, self.upstream):
            if not side.gone:
                side.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end(self) -> None:
        self._cancel_timer()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        seconds = asyncio.get_running_loop().time() - self._opened
        log.info("websocket_ended route=%s id=%s seconds=%.1f client_bytes=%d "
                 "upstream_bytes=%d", self.route, self.request_id, seconds, self.client.sent,
                 self.upstream.sent)
        self._ended(self)
