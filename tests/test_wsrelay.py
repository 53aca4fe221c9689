"""The WebSocket byte relay: frame boundaries from headers alone, and the relay on real
sockets (frames of the gateway's own only between theirs, closes, pings, flow control).

aiohttp's own WebSocket writer makes the frames and its reader reads what the relay wrote:
the relay's frame handling is checked against another implementation, not against itself."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.reader import WebSocketDataQueue  # the reader's queue: test oracle only
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_websocket import WebSocketReader, WebSocketWriter

from gateway.websocket import SocketWatch
from gateway.wsrelay import Frames, Relay, close_frame


class _Collect:
    """A transport that keeps what aiohttp's writer writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


async def frames_of(messages: list[tuple[int, bytes]], *, masked: bool) -> list[bytes]:
    """Each (opcode, payload) as aiohttp's writer frames it, one frame each."""
    out = []
    for opcode, payload in messages:
        sink = _Collect()
        writer = WebSocketWriter(BaseProtocol(asyncio.get_running_loop()), sink,  # type: ignore[arg-type]
                                 use_mask=masked)
        await writer.send_frame(payload, WSMsgType(opcode))
        out.append(bytes(sink.data))
    return out


async def read_messages(data: bytes) -> list[tuple[WSMsgType, object]]:
    """What aiohttp's reader makes of `data` (masked or not), in order."""
    loop = asyncio.get_running_loop()
    queue = WebSocketDataQueue(BaseProtocol(loop), 2**20, loop=loop)
    reader = WebSocketReader(queue, 0, compress=False, decode_text=False)
    reader.feed_data(data)
    messages: list[tuple[WSMsgType, object]] = []
    while queue._buffer:  # everything fed is already parsed
        message = await queue.read()
        messages.append((message.type, message.data))
    return messages


_MIXED = [(0x1, b"hi"), (0x2, b""), (0x9, b"p"), (0x2, b"x" * 125), (0x2, b"y" * 126),
          (0xA, b""), (0x2, b"z" * 65535), (0x2, b"w" * 65536), (0x1, "é".encode() * 40000),
          (0x8, (1000).to_bytes(2, "big"))]


@pytest.mark.parametrize("masked", [False, True])
async def test_frame_ends_are_found_however_the_bytes_are_split(masked: bool) -> None:
    frames = await frames_of(_MIXED, masked=masked)
    stream = b"".join(frames)
    ends, total = [], 0
    for frame in frames:
        total += len(frame)
        ends.append(total)
    rng = random.Random(7)  # noqa: S311 - reproducible splits, not secrets
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
        found, tracker, offset = [], Frames(), 0
        for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            chunk, i = stream[start:stop], 0
            while i < len(chunk):
                i = tracker.scan(chunk, i, first_end=True)
                if tracker.between:
                    found.append(offset + i)
            offset += len(chunk)
        assert found == ends
        assert tracker.closed and tracker.data


async def test_only_data_frames_count_as_activity() -> None:
    tracker = Frames()
    for frame in await frames_of([(0x9, b"ping"), (0xA, b"pong")], masked=True):
        tracker.scan(frame)
    assert not tracker.data
    (text,) = await frames_of([(0x1, b"x")], masked=True)
    tracker.scan(text)
    assert tracker.data


@pytest.mark.parametrize("masked", [False, True])
async def test_close_frames_read_as_aiohttp_reads_them(masked: bool) -> None:
    frame = close_frame(1008, b"session ended", masked=masked)
    assert bool(frame[1] & 0x80) == masked
    assert await read_messages(frame) == [(WSMsgType.CLOSE, 1008)]


@dataclass
class End:
    """The far end of one of the relay's connections: the test's client or upstream."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def read_exactly(self, size: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(size), timeout=5)

    async def read_to_eof(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(), timeout=5)

    async def nothing_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.reader.read(1), timeout=seconds)
        except TimeoutError:
            return True
        return False


@dataclass
class Setup:
    relay: Relay
    client: End
    upstream: End
    ended: asyncio.Event


async def _connected_transport() -> tuple[asyncio.Transport, End]:
    ends: asyncio.Queue[End] = asyncio.Queue()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ends.put(End(reader, writer))

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, "127.0.0.1", port)
    end = await ends.get()
    server.close()
    return transport, end


Relayed = Callable[..., Awaitable[Setup]]


@pytest.fixture
async def relayed() -> AsyncIterator[Relayed]:
    """Makes a relay between two real loopback connections, each with its far end."""
    setups: list[Setup] = []

    async def make(ping_interval: float = 0, close_timeout: float = 5,
                   ended_too: Callable[[Relay], None] | None = None) -> Setup:
        (client_transport, client), (upstream_transport, upstream) = \
            await _connected_transport(), await _connected_transport()
        ended = asyncio.Event()

        def end(relay: Relay) -> None:
            ended.set()
            if ended_too is not None:
                ended_too(relay)

        relay = Relay(client_transport, upstream_transport, route="r", request_id="i",
                      session=None,
                      idle_timeout=None, ping_interval=ping_interval,
                      close_timeout=close_timeout, ended=end)
        relay.start(b"", b"")
        setup = Setup(relay, client, upstream, ended)
        setups.append(setup)
        return setup

    yield make
    for setup in setups:
        for end in (setup.client, setup.upstream):
            end.writer.close()


async def test_bytes_pass_both_ways_unchanged(relayed: Relayed) -> None:
    s = await relayed()
    to_upstream = b"".join(await frames_of(_MIXED[:-1], masked=True))
    to_client = b"".join(await frames_of(_MIXED[:-1], masked=False))
    s.client.writer.write(to_upstream)
    s.upstream.writer.write(to_client)
    assert await s.upstream.read_exactly(len(to_upstream)) == to_upstream
    assert await s.client.read_exactly(len(to_client)) == to_client


async def test_a_close_from_the_gateway_waits_for_the_frame_in_flight(relayed: Relayed) -> None:
    s = await relayed()
    first, second = await frames_of([(0x2, b"a" * 1000), (0x1, b"after")], masked=False)
    s.upstream.writer.write(first[:500])
    assert await s.client.read_exactly(500) == first[:500]
    s.relay.close(1008, b"session ended")
    # the upstream's side was between frames: its close goes at once, masked
    upstream_got = await s.upstream.read_exactly(len(close_frame(1008, b"session ended",
                                                                 masked=True)))
    assert await read_messages(upstream_got) == [(WSMsgType.CLOSE, 1008)]
    assert await s.client.nothing_within(0.2)  # not inside their frame
    s.upstream.writer.write(first[500:] + second)
    rest = await s.client.read_exactly(len(first) - 500 + 2 + 2 + len(b"session ended"))
    assert rest[: len(first) - 500] == first[500:]
    assert await read_messages(first[:500] + rest) == [
        (WSMsgType.BINARY, b"a" * 1000), (WSMsgType.CLOSE, 1008)]  # and nothing after it
    # each end answers with its close; then the relay ends both connections
    (client_close,) = await frames_of([(0x8, (1008).to_bytes(2, "big"))], masked=True)
    s.client.writer.write(client_close)
    assert await s.client.read_to_eof() == b""
    (upstream_close,) = await frames_of([(0x8, (1008).to_bytes(2, "big"))], masked=False)
    s.upstream.writer.write(upstream_close)
    assert await s.upstream.read_to_eof() == b""
    await asyncio.wait_for(s.ended.wait(), timeout=5)


async def test_a_client_inside_a_frame_at_the_close_sends_not_a_byte_more(
        relayed: Relayed) -> None:
    """Revoked mid-frame: the rest of the client's frame, and anything after it, never
    reaches the upstream, whose connection ends at once (no close frame can go inside the
    client's frame)."""
    s = await relayed()
    first, second = await frames_of([(0x2, b"c" * 1000), (0x1, b"more")], masked=True)
    s.client.writer.write(first[:400])
    assert await s.upstream.read_exactly(400) == first[:400]
    s.relay.close(1008, b"session ended")
    s.client.writer.write(first[400:] + second)
    assert await s.upstream.read_to_eof() == b""
    got = await s.client.read_exactly(2 + 2 + len(b"session ended"))
    assert await read_messages(got) == [(WSMsgType.CLOSE, 1008)]  # the client is told why


async def test_ends_that_never_answer_a_close_are_cut_after_the_timeout(
        relayed: Relayed) -> None:
    s = await relayed(close_timeout=0.3)
    s.relay.close(1001, b"server shutdown")
    loop = asyncio.get_running_loop()
    started = loop.time()
    for end in (s.client, s.upstream):
        got = await end.read_to_eof()
        assert (await read_messages(got))[0] == (WSMsgType.CLOSE, 1001)
    await asyncio.wait_for(s.ended.wait(), timeout=5)
    assert loop.time() - started < 3


async def test_an_end_that_leaves_without_a_close_gets_the_other_a_going_away(
        relayed: Relayed) -> None:
    s = await relayed()
    s.client.writer.close()
    got = await s.upstream.read_to_eof()
    assert await read_messages(got) == [(WSMsgType.CLOSE, 1001)]
    await asyncio.wait_for(s.ended.wait(), timeout=5)


async def test_a_client_that_answers_no_ping_is_cut(relayed: Relayed) -> None:
    deaf = await relayed(ping_interval=0.4)
    alive = await relayed(ping_interval=0.4)
    assert await deaf.client.read_exactly(2) == b"\x89\x00"  # a ping, no payload
    assert await alive.client.read_exactly(2) == b"\x89\x00"
    (pong,) = await frames_of([(0xA, b"")], masked=True)
    alive.client.writer.write(pong)
    assert await deaf.client.read_to_eof() == b""  # cut: nothing more came
    assert await read_messages(await deaf.upstream.read_to_eof()) == [(WSMsgType.CLOSE, 1001)]
    assert await alive.upstream.read_exactly(len(pong)) == pong  # relayed: unsolicited is fine
    assert await alive.client.read_exactly(2) == b"\x89\x00"  # the next ping: still open
    assert not alive.ended.is_set()


async def test_a_client_that_does_not_read_stops_the_upstream_being_read(
        relayed: Relayed) -> None:
    s = await relayed()
    upstream_transport = s.relay.upstream.transport
    block = b"\x82\x7f" + (1 << 20).to_bytes(8, "big") + b"b" * (1 << 20)  # 1 MiB frames
    sent = 0
    for _ in range(64):
        s.upstream.writer.write(block)
        sent += len(block)
        await asyncio.sleep(0.01)
        if not upstream_transport.is_reading():
            break
    assert not upstream_transport.is_reading()  # the client's buffer is full: backpressure
    got = 0
    while got < sent:  # the client reads again: all of it arrives, and reading resumes
        got += len(await asyncio.wait_for(s.client.reader.read(1 << 20), timeout=5))
    assert got == sent
    assert upstream_transport.is_reading()


async def test_an_end_that_stopped_reading_is_cut_when_the_other_leaves(
        relayed: Relayed) -> None:
    """Closing waits for what was written to be sent; a client that reads nothing more
    would hold the socket for ever, so it is cut after the close timeout."""
    s = await relayed(close_timeout=0.5)
    client = s.relay.client.transport
    (frame,) = await frames_of([(0x2, b"b" * 16000)], masked=False)
    for _ in range(2000):  # until the kernel's buffers are full and the relay holds some
        s.upstream.writer.write(frame)
        await asyncio.sleep(0.005)
        if client.get_write_buffer_size():
            break
    assert client.get_write_buffer_size() and s.relay.upstream.transport.is_reading()
    s.upstream.writer.transport.abort()  # the upstream leaves; the client still reads nothing
    await asyncio.wait_for(s.ended.wait(), timeout=5)
    assert s.relay.client.gone


async def test_a_ping_waits_behind_a_long_frame_and_a_reading_client_is_kept(
        relayed: Relayed) -> None:
    """The ping cannot go inside the upstream's frame; a client that takes that frame's bytes
    (and, as browsers do, sends nothing) is alive, and is pinged once the frame ends."""
    s = await relayed(ping_interval=0.4)
    payload = b"p" * 4000
    (frame,) = await frames_of([(0x2, payload)], masked=False)
    (pong,) = await frames_of([(0xA, b"")], masked=True)
    got = b""
    for i in range(0, len(frame), 400):  # 2 s of one frame, a piece every 0.2 s
        if i:
            await asyncio.sleep(0.2)
        s.upstream.writer.write(frame[i:i + 400])
        got += await s.client.read_exactly(len(frame[i:i + 400]))
    assert got == frame and not s.ended.is_set()
    assert await s.client.read_exactly(2) == b"\x89\x00"  # the ping, after the frame
    s.client.writer.write(pong)
    await asyncio.sleep(0.5)
    assert not s.ended.is_set()


async def test_a_client_the_relay_stopped_reading_is_not_taken_for_gone(
        relayed: Relayed) -> None:
    """An upstream slow to take the client's bytes stops the relay reading the client, so
    its pongs are not read either: that is not a dead client."""
    s = await relayed(ping_interval=0.4)
    block = b"\x82\x7f" + (1 << 20).to_bytes(8, "big") + b"u" * (1 << 20)
    for _ in range(64):
        s.client.writer.write(block)
        await asyncio.sleep(0.01)
        if not s.relay.client.transport.is_reading():
            break
    assert not s.relay.client.transport.is_reading()
    await asyncio.sleep(1.2)  # three ping intervals, no pong read
    assert not s.ended.is_set() and not s.relay.closing


async def test_a_socket_handed_over_during_shutdown_is_told_at_once(
        relayed: Relayed) -> None:
    """A handshake still waiting for its 101 when shutdown began: its socket gets the 1001
    too (it used to be left open, and the watch's task started again)."""

    async def nobody_ended(ids: object) -> set[str]:
        return set()

    watch = SocketWatch(nobody_ended)
    s = await relayed(ended_too=watch.discard)
    shutdown = asyncio.create_task(watch.close_all(within=5))
    await asyncio.sleep(0.05)
    watch.add(s.relay)
    for end in (s.client, s.upstream):
        got = await end.read_exactly(2 + 2 + len(b"server shutdown") + (4 if end is s.upstream
                                                                       else 0))
        assert await read_messages(got) == [(WSMsgType.CLOSE, 1001)]
        end.writer.close()
    await asyncio.wait_for(shutdown, timeout=3)
    await asyncio.wait_for(s.ended.wait(), timeout=3)
    assert len(watch) == 0
