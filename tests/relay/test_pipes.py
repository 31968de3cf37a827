"""StreamPipe on real loopback TCP: each toxic measured at the reading end of a socket pair.

The pipe writes into one end of a connected TCP pair (the Sink is that socket); the test reads
the other end on the same event loop, stamping each read with the loop's clock. Timings are
behaviour (latency adds its delay, bandwidth keeps its rate), checked with tolerances for a
loaded machine: never early, a little late allowed.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from sockserve.relay.pipes import StreamPipe
from sockserve.relay.toxics import Toxic, ToxicSet, parse_toxic

#: how late a timer may fire on a loaded 2-core machine (it is never allowed to be early)
LATE = 0.06


class SocketSink:
    """The far side: one end of a real TCP connection; records what the pipe asked of it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writes: list[bytes] = []
        self.calls: list[str] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.sock.sendall(data)

    def write_eof(self) -> None:
        self.calls.append("eof")
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.calls.append("close")
        self.sock.close()

    def reset(self) -> None:
        self.calls.append("reset")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class Reader:
    """The reading end: every chunk with the loop time it came, and how the stream ended."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.chunks: list[tuple[float, bytes]] = []
        self.end: str | None = None  # "eof" or "reset"
        self.ended_at = 0.0

    @property
    def data(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await loop.sock_recv(self.sock, 65536)
            except ConnectionResetError:
                self.end, self.ended_at = "reset", loop.time()
                return
            if not chunk:
                self.end, self.ended_at = "eof", loop.time()
                return
            self.chunks.append((loop.time(), chunk))


Body = Callable[[StreamPipe, Reader, SocketSink], Awaitable[None]]


def run_pipe(toxics: ToxicSet | list[Toxic], body: Body, **options: object) -> None:
    """A StreamPipe over a fresh loopback TCP pair, ``body`` driving it (at most 5 s)."""

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            far = socket.create_connection(listener.getsockname(), timeout=5)
            near, _ = listener.accept()
        far.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        near.setblocking(False)
        sink, reader = SocketSink(far), Reader(near)
        toxic_set = toxics if isinstance(toxics, ToxicSet) else ToxicSet(toxics)
        loop = asyncio.get_running_loop()
        pipe = StreamPipe(
            loop,
            toxic_set,
            "downstream",
            sink,
            pause=lambda: None,
            resume=lambda: None,
            rng=random.Random(7),
            **options,  # type: ignore[arg-type]
        )
        try:
            await asyncio.wait_for(body(pipe, reader, sink), 5)
        finally:
            pipe.close()
            far.close()
            near.close()

    asyncio.run(main())


async def until_ended(reader: Reader) -> None:
    await asyncio.wait_for(reader.run(), 3)


def test_no_toxic_passes_straight_through() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        assert pipe.passthrough
        pipe.feed(b"hello")
        pipe.feed_eof()
        await until_ended(reader)
        assert reader.data == b"hello" and reader.end == "eof" and pipe.applied == {}

    run_pipe([], body)


def test_latency_adds_its_delay_and_keeps_order() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        assert not pipe.passthrough
        loop = asyncio.get_running_loop()
        sent = []
        for i in range(3):
            sent.append(loop.time())
            pipe.feed(b"%d" % i)
            await asyncio.sleep(0.02)
        pipe.feed_eof()
        await until_ended(reader)
        assert reader.data == b"012"
        # each read is one chunk here (20 ms apart); each came 100 ms after it was fed
        for t0, (t1, _) in zip(sent, reader.chunks, strict=False):
            assert 0.1 <= t1 - t0 <= 0.1 + LATE
        assert pipe.applied == {"latency": 1}

    run_pipe([parse_toxic("latency=100")], body)


def test_jitter_stays_within_its_bounds_and_order_is_kept() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        payload = bytes(range(40))
        for b in payload:
            pipe.feed(bytes([b]))
        pipe.feed_eof()
        await until_ended(reader)
        assert reader.data == payload  # order kept although each delay differs
        assert reader.chunks[0][0] - t0 >= 0.03 and reader.chunks[-1][0] - t0 <= 0.07 + LATE

    run_pipe([parse_toxic("latency=50,jitter=20")], body)


def test_bandwidth_keeps_its_rate_steadily() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pipe.feed(bytes(40_000))  # 1 s at 40 KB/s
        pipe.feed_eof()
        await until_ended(reader)
        elapsed = reader.chunks[-1][0] - t0
        assert len(reader.data) == 40_000
        assert 1.0 <= elapsed <= 1.1, elapsed  # within 10% of the rate, never above it
        half = sum(len(c) for t, c in reader.chunks if t - t0 <= 0.5)
        assert 16_000 <= half <= 24_000, half  # steady, not a burst at the end

    run_pipe([parse_toxic("bandwidth=40")], body)


def test_limit_data_closes_after_exactly_its_bytes() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        pipe.feed(b"a" * 600)
        pipe.feed(b"b" * 600)
        pipe.feed(b"c" * 600)  # after the close: dropped
        await until_ended(reader)
        assert reader.data == b"a" * 600 + b"b" * 400 and reader.end == "eof"
        assert sink.calls == ["close"] and not pipe.passthrough

    run_pipe([parse_toxic("limit_data=1000")], body)


def test_limit_data_close_waits_for_a_later_latency() -> None:
    """The close travels in the chain after the bytes, as Toxiproxy's closed channel does."""

    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        t0 = asyncio.get_running_loop().time()
        pipe.feed(b"x" * 20)
        await until_ended(reader)
        assert reader.data == b"x" * 10 and reader.end == "eof"
        assert reader.ended_at - t0 >= 0.1

    run_pipe([parse_toxic("limit_data=10"), parse_toxic("latency=100,name=lag")], body)


def test_slicer_slices_with_its_delay() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        t0 = asyncio.get_running_loop().time()
        pipe.feed(bytes(range(250)) * 4)
        pipe.feed_eof()
        await until_ended(reader)
        assert reader.data == bytes(range(250)) * 4
        # Toxiproxy's halving: 1000 -> 500 -> 250 -> 125 -> 62/63 (at most average+variation)
        assert [len(w) for w in sink.writes] == [62, 63] * 8
        assert reader.ended_at - t0 >= 15 * 0.01  # 10 ms after each slice
        assert len(reader.chunks) > 1

    run_pipe([parse_toxic("slicer=100,delay=10000")], body)


def test_slicer_with_variation_still_delivers_everything() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        payload = random.Random(3).randbytes(5000)
        pipe.feed(payload)
        pipe.feed_eof()
        await until_ended(reader)
        assert reader.data == payload
        assert all(0 < len(w) <= 40 for w in sink.writes) and len(sink.writes) > 125

    run_pipe([parse_toxic("slicer=20,size_variation=15")], body)


def test_slow_close_delays_the_close_only() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        t0 = asyncio.get_running_loop().time()
        pipe.feed(b"data")
        pipe.feed_eof()
        await until_ended(reader)
        assert reader.data == b"data" and reader.chunks[0][0] - t0 <= LATE
        assert reader.end == "eof" and 0.2 <= reader.ended_at - t0 <= 0.2 + LATE

    run_pipe([parse_toxic("slow_close=200")], body)


def test_timeout_stops_data_then_closes() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        t0 = asyncio.get_running_loop().time()
        pipe.feed(b"never seen")
        await until_ended(reader)
        assert reader.data == b"" and reader.end == "eof" and sink.calls == ["close"]
        assert 0.15 <= reader.ended_at - t0 <= 0.15 + LATE

    run_pipe([parse_toxic("timeout=150")], body)


def test_timeout_zero_holds_until_removed() -> None:
    toxics = ToxicSet([parse_toxic("timeout=0")])

    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        task = asyncio.ensure_future(reader.run())
        pipe.feed(b"held ")
        pipe.feed(b"back")
        await asyncio.sleep(0.3)
        assert reader.chunks == [] and not task.done()
        toxics.remove("timeout_downstream")  # what it held flows on, in order
        assert pipe.passthrough
        pipe.feed(b"!")
        pipe.feed_eof()
        await asyncio.wait_for(task, 3)
        assert reader.data == b"held back!" and reader.end == "eof"

    run_pipe(toxics, body)


def test_reset_peer_resets_after_its_timeout() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        t0 = asyncio.get_running_loop().time()
        pipe.feed(b"lost")
        await until_ended(reader)
        assert reader.end == "reset" and reader.data == b"" and sink.calls == ["reset"]
        assert 0.1 <= reader.ended_at - t0 <= 0.1 + LATE

    run_pipe([parse_toxic("reset_peer=100")], body)


def test_reset_peer_reaches_the_reader_as_connection_reset() -> None:
    """The RST seen by a plain blocking reader: recv raises ConnectionResetError."""

    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        pipe.feed(b"x")
        await asyncio.sleep(0.05)
        reader.sock.setblocking(True)
        reader.sock.settimeout(2)
        with pytest.raises(ConnectionResetError):
            reader.sock.recv(10)

    run_pipe([parse_toxic("reset_peer=0")], body)


def test_a_chain_of_toxics_keeps_every_byte_in_order() -> None:
    async def body(pipe: StreamPipe, reader: Reader, sink: SocketSink) -> None:
        rng = random.Random(11)
        payload = rng.randbytes(30_000)
        i = 0
        while i < len(payload):
            n = rng.randrange(1, 4000)
            pipe.feed(payload[i : i + n])
            i += n
            if rng.random() < 0.3:
                await asyncio.sleep(0.005)
        pipe.feed_eof()
        await until_ended(reader)
        assert reader.data == payload and reader.end == "eof"
        assert pipe.applied == {"latency": 1, "slicer": 1, "bandwidth": 1, "slow_close": 1}

    run_pipe(
        [
            parse_toxic("latency=20,jitter=10"),
            parse_toxic("slicer=500,size_variation=200"),
            parse_toxic("bandwidth=200"),
            parse_toxic("slow_close=10"),
        ],
        body,
    )
