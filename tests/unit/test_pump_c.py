"""The relay's pump on the fast path (KIND_PUMP specs of ``poll_fast``), the C helper
(``_speedups_c/pump.c``) and its twin (``fastpath.serve_pump``) side by side on real
socket pairs: the same items, the same bytes on the wire, the same state counters.

Each world: a pair a<->a2 (the source: bytes written on a2 are read from a) and b<->b2
(the peer: the pump sends to b, the test reads b2). a is registered with an epoll set
and its spec names b's fd.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from strict import needs

from sockserve._engine import fastio, fastpath

try:
    from sockserve import _speedups
except ImportError:  # not built: CI (CI=true) fails the C side instead of skipping
    _speedups = None  # type: ignore[assignment]

SIDES = [
    pytest.param("c", marks=needs(_speedups is not None, "sockserve._speedups is not built")),
    "py",
]
NEVER = 2**62


class World:
    def __init__(self, splice_after: int) -> None:
        self.a, self.a2 = socket.socketpair()
        self.b, self.b2 = socket.socketpair()
        for s in (self.a, self.b):
            s.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.a.fileno(), select.EPOLLIN)
        self.state = bytearray(fastio.PUMP_STATE)
        self.view = memoryview(self.state).cast("q")
        self.view[2] = self.view[3] = -1
        self.member = object()
        self.spec: Any = (self.member, self.b.fileno(), self.state, splice_after, fastio.KIND_PUMP)
        self.fast: dict[int, Any] = {self.a.fileno(): self.spec}

    def poll(self, side: str) -> tuple[int, list[tuple[int, Any]], Any]:
        select.select([self.a], [], [], 5)
        if side == "c":
            n, items, error = _speedups.poll_fast(self.ep.fileno(), 64, self.fast)
        else:
            n, items, error = fastpath.poll_fast(self.ep, 64, self.fast)
        for fd, tag, _, member in items:
            assert fd == self.a.fileno()
            assert member is (None if tag == fastio.EVENT else self.member)
        return n, [(tag, value) for _, tag, value, _ in items], error

    def close(self) -> None:
        for fd in (self.view[2], self.view[3]):
            if fd >= 0:
                os.close(fd)
        self.view[2] = self.view[3] = -1
        self.ep.close()
        for s in (self.a, self.a2, self.b, self.b2):
            s.close()


@contextmanager
def world(splice_after: int = NEVER) -> Iterator[World]:
    w = World(splice_after)
    try:
        yield w
    finally:
        w.close()


def drain(s: socket.socket, want: int) -> bytes:
    s.settimeout(5)
    got = bytearray()
    while len(got) < want:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("splice_after", [NEVER, 0])
def test_bytes_go_to_the_peer_and_are_counted(side: str, splice_after: int) -> None:
    with world(splice_after) as w:
        w.a2.sendall(b"hello relay")
        assert w.poll(side) == (1, [], None)  # moved in full: no item
        assert drain(w.b2, 11) == b"hello relay"
        assert w.view[0] == 11
        assert (w.view[2] >= 0) == (splice_after == 0)  # a pipe only once big reads passed
        assert w.view[4] == 0


@pytest.mark.parametrize("side", SIDES)
def test_big_reads_switch_the_direction_to_splice(side: str) -> None:
    with world(splice_after=fastio.BIG_READ) as w:
        w.b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        data = os.urandom(200_000)
        w.a2.sendall(data[:100_000])
        w.poll(side)
        got = drain(w.b2, 100_000)
        assert w.view[2] >= 0 and w.view[3] >= 0  # past BIG_READ in big reads: a pipe
        w.a2.sendall(data[100_000:])
        while len(got) < len(data):
            w.poll(side)
            got += drain(w.b2, min(65536, len(data) - len(got)))
        assert got == data
        assert w.view[0] == len(data)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("splice_after", [NEVER, 0])
def test_a_full_peer_leaves_the_rest_to_the_member(side: str, splice_after: int) -> None:
    with world(splice_after) as w:
        w.b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        w.b2.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        data = os.urandom(3 << 20)
        w.a2.setblocking(False)
        sent = 0
        try:
            while sent < len(data):
                sent += w.a2.send(data[sent:])
        except BlockingIOError:
            pass
        items: list[tuple[int, Any]] = []
        while not items:
            _, items, error = w.poll(side)
            assert error is None
        ((tag, rest),) = items
        assert tag == fastio.PARTIAL
        moved = w.view[0]
        if splice_after == 0:
            assert rest is None and w.view[4] > 0  # the rest waits in the pipe
            w.a2.send(b"more")  # readable again: still nothing read while the pipe holds
            assert w.poll(side)[1] == [(fastio.PARTIAL, None)]
            assert w.view[0] == moved
        else:
            assert isinstance(rest, bytes) and rest and w.view[4] == 0
        wire = drain(w.b2, moved)
        assert wire == data[:moved]  # what went is in order, what is held comes next
        nxt = data[moved : moved + len(rest)] if rest is not None else None
        assert rest == nxt


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("splice_after", [NEVER, 0])
def test_end_of_stream(side: str, splice_after: int) -> None:
    with world(splice_after) as w:
        w.a2.sendall(b"last")
        w.a2.shutdown(socket.SHUT_WR)
        items = w.poll(side)[1]
        if not items:  # the bytes and the FIN read apart
            items = w.poll(side)[1]
        assert items == [(fastio.EOF, None)]
        assert drain(w.b2, 4) == b"last"


@pytest.mark.parametrize("side", SIDES)
def test_a_hang_up_goes_to_the_member(side: str) -> None:
    """A reset or hang-up is not exactly EPOLLIN: the member's on_event reads it."""
    with world() as w:
        w.a2.close()
        w.a2 = socket.socket()  # closed again at the end: harmless
        _, items, _ = w.poll(side)
        ((tag, bits),) = items
        assert tag == fastio.EVENT and bits & select.EPOLLHUP


@pytest.mark.parametrize("side", SIDES)
def test_a_peer_gone_is_an_errno(side: str) -> None:
    with world() as w:
        w.b2.close()
        w.a2.sendall(b"x")
        assert w.poll(side)[1] == [(fastio.ERRNO, 32)]  # EPIPE


def bad_specs(w: World) -> list[Any]:
    short = bytearray(8)
    m = w.member
    return [
        (m, "3", w.state, 0, fastio.KIND_PUMP),
        (m, 2**40, w.state, 0, fastio.KIND_PUMP),
        (m, w.b.fileno(), bytes(40), 0, fastio.KIND_PUMP),
        (m, w.b.fileno(), short, 0, fastio.KIND_PUMP),
        (m, w.b.fileno(), w.state, -1, fastio.KIND_PUMP),
        (m, w.b.fileno(), w.state, 0, fastio.KIND_PUMP + 1),
    ]


@needs(_speedups is not None, "sockserve._speedups is not built")
@pytest.mark.parametrize("index", range(6))
def test_bad_pump_specs_fail_alike(index: int) -> None:
    errors: list[Any] = []
    for side in ("c", "py"):
        with world() as w:
            w.fast[w.a.fileno()] = bad_specs(w)[index]
            w.a2.sendall(b"data")
            n, items, error = w.poll(side)
            errors.append((n, items, type(error)))
            assert drain_nowait(w.a) == b"data"  # nothing was read and lost
    assert errors[0] == errors[1]
    assert errors[0][2] in (TypeError, OverflowError, ValueError)


def drain_nowait(s: socket.socket) -> bytes:
    try:
        return s.recv(100)
    except BlockingIOError:
        return b""
