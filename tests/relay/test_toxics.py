"""Toxics in motion: toxicity per connection, live changes reaching open pipes (from the loop
and from another thread), backpressure, and the datagram toxics on real loopback UDP."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import Awaitable, Callable

import pytest

from sockserve.relay.pipes import DatagramPipe, StreamPipe
from sockserve.relay.toxics import Toxic, ToxicError, ToxicSet, parse_toxic


class SocketSink:
    """One end of a real TCP pair; the pipe's far side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def write_eof(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        self.sock.close()


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        far = socket.create_connection(listener.getsockname(), timeout=5)
        near, _ = listener.accept()
    near.setblocking(False)
    return far, near


async def read_until(near: socket.socket, n: int, timeout: float = 3) -> tuple[float, bytes]:
    """Read ``n`` bytes; returns when the last came and the bytes."""
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(near, n - len(got)), timeout)
        assert chunk, f"EOF after {got!r}"
        got += chunk
    return loop.time(), got


def nothing() -> None:
    pass


def stream_pipe(
    toxics: ToxicSet,
    far: socket.socket,
    seed: int | None = 1,
    *,
    pause: Callable[[], None] = nothing,
    resume: Callable[[], None] = nothing,
    high_water: int = 256 * 1024,
) -> StreamPipe:
    return StreamPipe(
        asyncio.get_running_loop(),
        toxics,
        "downstream",
        SocketSink(far),
        pause=pause,
        resume=resume,
        rng=None if seed is None else random.Random(seed),
        high_water=high_water,
    )


def test_toxicity_is_drawn_once_per_connection() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        never = ToxicSet([parse_toxic("latency=10000,toxicity=0")])
        always = ToxicSet([parse_toxic("latency=10000,toxicity=1")])
        half = ToxicSet([parse_toxic("latency=10000,toxicity=0.5")])
        sink = SocketSink(socket.socket())
        try:
            for toxics, seeds in ((never, range(50)), (always, range(50))):
                pipes = [
                    StreamPipe(
                        loop,
                        toxics,
                        "downstream",
                        sink,
                        pause=nothing,
                        resume=nothing,
                        rng=random.Random(s),
                    )
                    for s in seeds
                ]
                assert {p.passthrough for p in pipes} == {toxics is never}
                for p in pipes:
                    p.close()
            # unseeded, 400 connections: binomial(400, 0.5) is 200 ± 10; 5 sigma bounds
            pipes = [
                StreamPipe(loop, half, "downstream", sink, pause=nothing, resume=nothing)
                for _ in range(400)
            ]
            applied = sum(not p.passthrough for p in pipes)
            assert 150 <= applied <= 250, applied
            assert sum(p.applied.get("latency", 0) for p in pipes) == applied
            for p in pipes:
                p.close()
        finally:
            sink.sock.close()

    asyncio.run(main())


def test_toxicity_zero_never_delays_and_one_always_does() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for toxicity, slow in ((0.0, False), (1.0, True)):
            far, near = await tcp_pair()
            toxics = ToxicSet([Toxic("latency", toxicity=toxicity, attributes={"latency": 150})])
            pipe = stream_pipe(toxics, far, seed=None)
            t0 = loop.time()
            pipe.feed(b"ping")
            t1, got = await read_until(near, 4)
            assert got == b"ping" and (t1 - t0 >= 0.15) is slow
            pipe.close()
            far.close()
            near.close()

    asyncio.run(main())


def test_live_add_update_remove_reach_an_open_pipe() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        far, near = await tcp_pair()
        toxics = ToxicSet()
        pipe = stream_pipe(toxics, far)
        try:
            assert pipe.passthrough
            toxics.add(parse_toxic("latency=100"))
            assert not pipe.passthrough
            t0 = loop.time()
            pipe.feed(b"a")
            t1, got = await read_until(near, 1)
            assert got == b"a" and t1 - t0 >= 0.1
            toxics.update("latency_downstream", {"attributes": {"latency": 10}})
            t0 = loop.time()
            pipe.feed(b"b")
            t1, got = await read_until(near, 1)
            assert got == b"b" and 0.01 <= t1 - t0 < 0.1
            # removed while holding data: it flows on at once, in order, then straight through
            toxics.update("latency_downstream", {"attributes": {"latency": 5000}})
            pipe.feed(b"c")
            pipe.feed(b"d")
            t0 = loop.time()
            toxics.remove("latency_downstream")
            assert pipe.passthrough
            pipe.feed(b"e")
            t1, got = await read_until(near, 3)
            assert got == b"cde" and t1 - t0 < 0.1
        finally:
            pipe.close()
            far.close()
            near.close()

    asyncio.run(main())


def test_a_change_from_another_thread_reaches_the_pipe_on_its_loop() -> None:
    async def main() -> None:
        far, near = await tcp_pair()
        toxics = ToxicSet([parse_toxic("timeout=0")])
        pipe = stream_pipe(toxics, far)
        try:
            pipe.feed(b"held")
            await asyncio.sleep(0.05)
            remover = threading.Thread(target=toxics.remove, args=("timeout_downstream",))
            remover.start()
            _, got = await read_until(near, 4)
            remover.join(timeout=5)
            assert got == b"held" and pipe.passthrough
        finally:
            pipe.close()
            far.close()
            near.close()

    asyncio.run(main())


def test_held_bytes_pause_the_source_and_resume_it() -> None:
    async def main() -> None:
        far, near = await tcp_pair()
        toxics = ToxicSet([parse_toxic("timeout=0")])
        events: list[str] = []
        pipe = stream_pipe(
            toxics,
            far,
            high_water=1000,
            pause=lambda: events.append("pause"),
            resume=lambda: events.append("resume"),
        )
        try:
            pipe.feed(b"x" * 600)
            assert events == []
            pipe.feed(b"x" * 600)
            pipe.feed(b"x" * 600)  # a source may still send a little after pause()
            assert events == ["pause"]
            toxics.remove("timeout_downstream")
            assert events == ["pause", "resume"]
            _, got = await read_until(near, 1800)
            assert got == b"x" * 1800
        finally:
            pipe.close()
            far.close()
            near.close()

    asyncio.run(main())


def test_bandwidth_backpressure_resumes_as_bytes_leave() -> None:
    async def main() -> None:
        far, near = await tcp_pair()
        events: list[str] = []
        pipe = stream_pipe(
            ToxicSet([parse_toxic("bandwidth=100")]),
            far,
            high_water=8000,
            pause=lambda: events.append("pause"),
            resume=lambda: events.append("resume"),
        )
        try:
            pipe.feed(bytes(10_000))
            assert events == ["pause"]
            _, got = await read_until(near, 10_000)  # 100 ms at 100 KB/s
            assert got == bytes(10_000) and events == ["pause", "resume"] and pipe.held == 0
        finally:
            pipe.close()
            far.close()
            near.close()

    asyncio.run(main())


# --- datagrams -----------------------------------------------------------------------------

DatagramBody = Callable[[DatagramPipe, Callable[[], list[bytes]]], Awaitable[None]]


def run_datagrams(toxics: ToxicSet, body: DatagramBody, seed: int | None = 5) -> None:
    """A DatagramPipe sending on real loopback UDP; ``received()`` reads what has arrived."""

    async def main() -> None:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.connect(rx.getsockname())

        def received() -> list[bytes]:
            out = []
            while True:
                try:
                    out.append(rx.recv(65536))
                except BlockingIOError:
                    return out

        def send(datagram: bytes) -> None:
            tx.send(datagram)

        pipe = DatagramPipe(
            asyncio.get_running_loop(),
            toxics,
            "upstream",
            send,
            rng=None if seed is None else random.Random(seed),
        )
        try:
            await asyncio.wait_for(body(pipe, received), 5)
        finally:
            pipe.close()
            rx.close()
            tx.close()

    asyncio.run(main())


def numbered(i: int) -> bytes:
    return b"%04d" % i


def feed_all(pipe: DatagramPipe, received: Callable[[], list[bytes]], n: int) -> list[bytes]:
    """Feed ``n`` numbered datagrams in small batches (a loopback UDP buffer holds only so many)."""
    got: list[bytes] = []
    for i in range(n):
        pipe.feed(numbered(i))
        if i % 20 == 19:
            got += received()
    return got + received()


@pytest.mark.parametrize("seed", [5, None], ids=["seeded", "unseeded"])
def test_drop_half_within_binomial_bounds(seed: int | None) -> None:
    async def body(pipe: DatagramPipe, received: Callable[[], list[bytes]]) -> None:
        got = feed_all(pipe, received, 400)
        # binomial(400, 0.5): 200 ± 10; 5 sigma either way
        assert 150 <= len(got) <= 250, len(got)
        assert got == sorted(got) and len(set(got)) == len(got)
        assert pipe.applied == {"drop": 400 - len(got)}

    run_datagrams(ToxicSet([parse_toxic("drop=0.5", "upstream")]), body, seed)


def test_drop_nothing_and_everything() -> None:
    async def body(pipe: DatagramPipe, received: Callable[[], list[bytes]]) -> None:
        assert feed_all(pipe, received, 50) == [numbered(i) for i in range(50)]
        toxics.add(
            parse_toxic("drop,name=all", "upstream")
        )  # probability defaults to 1: a black hole
        assert feed_all(pipe, received, 50) == []
        toxics.remove("all")
        assert feed_all(pipe, received, 3) == [numbered(i) for i in range(3)]
        toxics.clear()
        assert pipe.passthrough and feed_all(pipe, received, 1) == [b"0000"]

    toxics = ToxicSet([parse_toxic("drop=0", "upstream")])
    run_datagrams(toxics, body)


def test_duplicate_sends_twice() -> None:
    async def body(pipe: DatagramPipe, received: Callable[[], list[bytes]]) -> None:
        assert feed_all(pipe, received, 3) == [b"0000", b"0000", b"0001", b"0001", b"0002", b"0002"]
        toxics.update("duplicate_upstream", {"attributes": {"probability": 0.5}})
        got = feed_all(pipe, received, 200)
        assert sorted(set(got)) == [numbered(i) for i in range(200)]
        assert 250 <= len(got) <= 350, len(got)  # 200 + binomial(200, 0.5)

    toxics = ToxicSet([Toxic("duplicate", stream="upstream")])
    run_datagrams(toxics, body)


def test_reorder_swaps_with_the_next_datagram_or_gives_up() -> None:
    async def body(pipe: DatagramPipe, received: Callable[[], list[bytes]]) -> None:
        loop = asyncio.get_running_loop()
        assert feed_all(pipe, received, 4) == [b"0001", b"0000", b"0003", b"0002"]
        pipe.feed(b"late")
        t0 = loop.time()
        assert received() == []
        while not (got := received()):
            await asyncio.sleep(0.005)
        assert got == [b"late"] and loop.time() - t0 >= 0.05

    run_datagrams(ToxicSet([parse_toxic("reorder=1,delay=50,stream=upstream")]), body)


def test_latency_on_datagrams_and_overflow() -> None:
    async def body(pipe: DatagramPipe, received: Callable[[], list[bytes]]) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pipe.feed(b"slow")
        pipe.feed(bytes(300 * 1024))  # more than the pipe holds: dropped, counted
        assert pipe.overflow == 1 and received() == []
        while not (got := received()):
            await asyncio.sleep(0.005)
        assert got == [b"slow"] and loop.time() - t0 >= 0.08

    run_datagrams(ToxicSet([parse_toxic("latency=80,stream=upstream")]), body)


def test_stream_toxics_are_refused_on_a_datagram_relay_and_ignored_by_its_pipe() -> None:
    with pytest.raises(ToxicError, match="slicer applies only to stream relays"):
        ToxicSet([parse_toxic("slicer=10")], transport="datagram")

    async def body(pipe: DatagramPipe, received: Callable[[], list[bytes]]) -> None:
        assert pipe.passthrough  # an unrestricted set: the stream toxic does not apply here
        assert feed_all(pipe, received, 2) == [b"0000", b"0001"]

    run_datagrams(ToxicSet([parse_toxic("limit_data=1,stream=upstream")]), body)
