"""Fault injection on real loopback sockets: after each fault the server is alive and answers.

Each test provokes one misbehaviour (oversized input, idle and slowloris clients, the
connection limit, EMFILE, a client that never reads, resets, random bytes, a raising
handler, UDP from a privileged port, a UDP flood) and then checks two things: the server
did what docs/reliability.md says, and a brand-new client is still answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from faultkit import (
    RLIMIT_WRAPPER,
    LogTap,
    assert_alive,
    assert_thread_alive,
    closed_by_peer,
    reset,
)
from strict import needs_root
from support import ServerProcess, addr_of, wait_for

import sockserve
from sockserve._engine.datagram import MAX_DATAGRAM_INFLIGHT
from sockserve._engine.faststream import FastStream
from sockserve._engine.requests import MAX_QUEUED
from sockserve._engine.stream import StreamProtocol
from sockserve.config import DEFAULT_WRITE_HIGH
from sockserve.server import ServerThread

pytestmark = pytest.mark.timeout(90)

Serve = Callable[..., ServerThread]


@pytest.fixture(params=["auto", "asyncio"], ids=["epoll", "asyncio"])
def engine(request: pytest.FixtureRequest) -> str:
    """Every fault runs on both engines: epoll (the default for plain sockets) and transports."""
    return str(request.param)


@pytest.fixture
def serve(serve: Serve, engine: str) -> Serve:
    def start(*args: Any, **options: Any) -> ServerThread:
        options.setdefault("engine", engine)
        return serve(*args, **options)

    return start


#: The most one read hands the protocol (uvloop and asyncio both read up to 256 KiB).
READ_CHUNK = 256 * 1024
NL = b"\n"


def stream_conns(st: ServerThread, index: int = 0) -> list[StreamProtocol | FastStream]:
    """Request/reply connections of either engine (epoll by default, transports for TLS)."""
    return [
        c
        for c in list(st.server.streams[index].conns)
        if isinstance(c, (StreamProtocol, FastStream))
    ]


def picky(request: bytes, ctx: sockserve.Context) -> bytes:
    if request.startswith(b"boom"):
        raise ValueError(f"boom requested by the test from {ctx.peer}")
    return b"ok " + request


async def apicky(request: bytes, ctx: sockserve.Context) -> bytes:
    await asyncio.sleep(0)
    return picky(request, ctx)


async def slow_upper(request: bytes, ctx: sockserve.Context) -> bytes:
    await asyncio.sleep(0.05)
    return request.upper()


# -- oversized input ---------------------------------------------------------------------


def test_oversized_line_closes_the_connection_and_buffers_no_more_than_the_cap(
    serve: Serve, server_logs: LogTap
) -> None:
    cap = 4096
    st = serve("timestamp", "tcp://127.0.0.1:0", framing="line", max_message=cap)
    attack = 10 * 2**20  # a 10 MB line without a newline
    chunk = b"x" * 16384
    peak = sent = 0
    with socket.create_connection(addr_of(st.url("tcp")), timeout=5) as s:
        try:
            while sent < attack:
                s.sendall(chunk)
                sent += len(chunk)
                peak = max([peak, *(c.buffered for c in stream_conns(st))])
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert sent < attack, "the server kept reading a line far past --max-message"
        assert closed_by_peer(s), "the connection stayed open after an oversized line"
    assert peak <= cap + 2 + READ_CHUNK, f"server buffered {peak} bytes of one line"
    server_logs.wait_for(f"protocol error: line longer than {cap} bytes")
    assert_thread_alive(st, framing="line")


def test_length_prefix_of_4_gib_is_refused_before_any_body(
    serve: Serve, server_logs: LogTap
) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", framing="length")
    with socket.create_connection(addr_of(st.url("tcp")), timeout=5) as s:
        s.sendall(b"\xff\xff\xff\xff" + b"y" * 1000)
        assert closed_by_peer(s), "a 4 GiB length prefix did not close the connection"
    server_logs.wait_for("frame length 4294967295 exceeds the 65536-byte cap")
    assert_thread_alive(st, framing="length")


@pytest.mark.parametrize(
    ("framing", "attack"),
    [("line", b"ok\n" + b"x" * 100), ("length", b"\x00\x00\x00\x02ok" + b"\xff" * 4)],
)
def test_whole_request_before_an_oversized_one_is_answered(
    serve: Serve, server_logs: LogTap, framing: str, attack: bytes
) -> None:
    """One read holding a good request then an oversized one: reply to the first, then close."""
    st = serve(picky, "tcp://127.0.0.1:0", framing=framing, max_message=16)
    with socket.create_connection(addr_of(st.url("tcp")), timeout=5) as s:
        s.sendall(attack)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(1024):
            got += chunk
    assert got in (b"ok ok\n", b"\x00\x00\x00\x05ok ok"), f"reply lost: {got!r}"
    server_logs.wait_for("protocol error:")
    assert_thread_alive(st, framing=framing)


def test_server_memory_does_not_grow_with_oversized_input() -> None:
    """Eight clients each try to push a 10 MB line; the server's peak RSS barely moves."""
    with ServerProcess("--listen", "tcp://127.0.0.1:0", "--framing", "line") as srv:
        addr = srv.addr("tcp")
        assert_alive(srv.url("tcp"), "line")
        before = _peak_rss(srv.proc.pid)
        chunk = b"z" * 65536
        for _ in range(8):
            with socket.create_connection(addr, timeout=5) as s:
                sent = 0
                try:
                    while sent < 10 * 2**20:
                        s.sendall(chunk)
                        sent += len(chunk)
                except (ConnectionResetError, BrokenPipeError):
                    pass
                assert closed_by_peer(s)
        grew = _peak_rss(srv.proc.pid) - before
        # 80 MB offered; a server that buffered it would grow by that much.
        assert grew < 16 * 2**20, f"server peak RSS grew by {grew} bytes"
        assert_alive(srv.url("tcp"), "line")


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


# -- idle and slowloris clients -----------------------------------------------------------


def test_idle_connection_is_closed(serve: Serve, server_logs: LogTap) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", idle_timeout=0.3)
    with socket.create_connection(addr_of(st.url("tcp")), timeout=5) as s:
        assert closed_by_peer(s, timeout=5), "an idle connection was never closed"
    server_logs.wait_for("(idle for 0.3s)")
    assert_thread_alive(st)


def test_slowloris_clients_that_never_finish_a_line_are_closed(serve: Serve) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", framing="line", idle_timeout=0.3)
    addr = addr_of(st.url("tcp"))
    socks = [socket.create_connection(addr, timeout=5) for _ in range(20)]
    open_socks = set(socks)
    deadline = time.monotonic() + 10
    try:
        while open_socks and time.monotonic() < deadline:
            for s in list(open_socks):
                try:
                    s.send(b"a")  # one byte at a time, never a newline
                except OSError:
                    open_socks.discard(s)
                    continue
                r, _, _ = select.select([s], [], [], 0)
                if r and closed_by_peer(s, timeout=1):
                    open_socks.discard(s)
            time.sleep(0.02)  # the trickle's pace, not a synchronisation
        assert not open_socks, f"{len(open_socks)} slowloris connection(s) still open"
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: st.server.conn_count == 0, what="slowloris connections to be dropped")
    assert_thread_alive(st, framing="line")


def test_a_client_that_keeps_completing_requests_is_not_idle(serve: Serve) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", framing="line", idle_timeout=0.3)
    with sockserve.connect(st.url("tcp"), framing="line", timeout=5) as c:
        end = time.monotonic() + 1.2  # four idle timeouts
        n = 0
        while time.monotonic() < end:
            assert c.request(b"tick %d" % n).endswith(b"tick %d" % n)
            n += 1
            time.sleep(0.05)  # the client's pace, well under the timeout


# -- the connection limit ------------------------------------------------------------------


def test_connection_limit_leaves_clients_in_the_backlog_until_a_slot_frees(
    serve: Serve, server_logs: LogTap
) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", max_conns=2)
    url = st.url("tcp")
    # reply_size keeps each raw connection open after its reply (a "[ctime] one" stamp is 30
    # bytes); without it a raw request has a connection of its own (issue 10, item 18).
    c1 = sockserve.connect(url, timeout=5, reply_size=30)
    c2 = sockserve.connect(url, timeout=5, reply_size=30)
    assert c1.request(b"one").endswith(b"one")
    assert c2.request(b"two").endswith(b"two")
    server_logs.wait_for("at the connection limit (2)")
    waiting = socket.create_connection(addr_of(url), timeout=5)  # the kernel completes it
    try:
        waiting.sendall(b"three")
        r, _, _ = select.select([waiting], [], [], 0.3)
        assert not r, "a client past --max-conns was served"
        assert st.server.conn_count == 2
        c1.close()
        waiting.settimeout(5)
        assert waiting.recv(1024).endswith(b"three"), "the waiting client was never served"
        server_logs.wait_for("below the connection limit again")
    finally:
        waiting.close()
        c2.close()
    assert_thread_alive(st)


def test_connection_limit_is_shared_and_freed_across_listeners(serve: Serve, sock_dir: Any) -> None:
    """A slot freed on one listener resumes accepting on another paused at the limit."""
    path = f"{sock_dir}/limit.sock"
    st = serve("timestamp", "tcp://127.0.0.1:0", f"unix://{path}", max_conns=2)
    # reply_size (a "[ctime] a" stamp is 28 bytes) keeps the raw connections open after the reply.
    tcp_a = sockserve.connect(st.url("tcp"), timeout=5, reply_size=28)
    assert tcp_a.request(b"a").endswith(b"a")
    unix_b = sockserve.connect(st.url("unix"), timeout=5, reply_size=28)
    assert unix_b.request(b"b").endswith(b"b")  # the unix listener pauses at the limit
    tcp_a.close()
    wait_for(lambda: st.server.conn_count == 1, what="the TCP connection to close")
    try:
        with sockserve.connect(st.url("unix"), timeout=5) as c:
            assert c.request(b"c").endswith(b"c")
    finally:
        unix_b.close()


def test_accept_emfile_is_logged_and_retried_not_fatal() -> None:
    """Run the server with RLIMIT_NOFILE=32 and open more clients than it has descriptors."""
    prefix = [sys.executable, "-c", RLIMIT_WRAPPER, "32"]
    with ServerProcess("--listen", "tcp://127.0.0.1:0", prefix=prefix) as srv:
        addr = srv.addr("tcp")
        clients = [socket.create_connection(addr, timeout=5) for _ in range(40)]
        try:
            srv.wait_line("accept failed: Too many open files")
        finally:
            for s in clients:
                s.close()
        assert srv.proc.poll() is None, "server died on EMFILE:\n" + srv.log
        deadline = time.monotonic() + 10
        while True:  # once descriptors free, the retry accepts again
            try:
                assert_alive(srv.url("tcp"))
                break
            except sockserve.ClientError:
                if time.monotonic() > deadline:
                    raise
        assert srv.proc.poll() is None


# -- a client that sends but never reads ---------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "handler", "payload"),
    [
        ("raw", "timestamp", b"x" * 65536),
        ("line", "timestamp", b"\n" * 65536),
        ("line", slow_upper, b"q\n" * 32768),
    ],
    ids=["raw", "line", "line-async"],
)
def test_never_reading_client_is_paused_and_memory_stays_bounded(
    serve: Serve, framing: str, handler: Any, payload: bytes
) -> None:
    st = serve(handler, "tcp://127.0.0.1:0", framing=framing)
    limit = 256 * 2**20
    sent = 0
    with socket.create_connection(addr_of(st.url("tcp")), timeout=5) as s:
        s.setblocking(False)
        while sent < limit:
            try:
                sent += s.send(payload)
            except BlockingIOError:
                _, w, _ = select.select([], [s], [], 1.0)
                if not w:
                    break  # our send buffer stays full: the server stopped reading us
        assert sent < limit, "the server kept reading from a client that never reads"
        (conn,) = stream_conns(st)
        assert conn.paused, "reading was not paused"
        unsent = conn.write_buffer_size
        assert unsent <= DEFAULT_WRITE_HIGH + 65536 + 64, f"{unsent} bytes of replies buffered"
        assert conn.buffered <= 2 * READ_CHUNK, f"{conn.buffered} bytes unparsed"
        assert conn.queued <= MAX_QUEUED, f"{conn.queued} requests queued"
    assert_thread_alive(st, framing=framing)


def test_paused_client_that_starts_reading_gets_every_reply(serve: Serve) -> None:
    """Backpressure loses nothing: every request sent while paused is answered in order."""
    st = serve("timestamp", "tcp://127.0.0.1:0", framing="line")
    n = 200_000
    requests = b"".join(b"%d\n" % i for i in range(n))
    with socket.create_connection(addr_of(st.url("tcp")), timeout=10) as s:
        got = bytearray()
        view = memoryview(requests)
        s.setblocking(False)
        deadline = time.monotonic() + 60
        while got.count(NL) < n:
            assert time.monotonic() < deadline, f"only {got.count(NL)} of {n} replies"
            r, w, _ = select.select([s], [s] if view else [], [], 5)
            if w:
                view = view[s.send(view[:65536]) :]
            if r:
                chunk = s.recv(1 << 20)
                assert chunk, "server closed early"
                got += chunk
    lines = bytes(got).splitlines()
    assert [ln.rsplit(b"] ", 1)[1] for ln in lines] == [b"%d" % i for i in range(n)]


# -- resets and random bytes -----------------------------------------------------------------


def test_fifty_clients_that_reset_mid_request(serve: Serve, server_logs: LogTap) -> None:
    st = serve(slow_upper, "tcp://127.0.0.1:0", framing="line")
    addr = addr_of(st.url("tcp"))
    socks = [socket.create_connection(addr, timeout=5) for _ in range(50)]
    wait_for(lambda: st.server.conn_count == 50, what="50 connections to be accepted")
    for i, s in enumerate(socks):
        # Half are inside a request (the async handler is running), half inside a line.
        s.sendall(b"request %d\n" % i if i % 2 else b"partial line %d" % i)
    wait_for(lambda: sum(c.busy for c in stream_conns(st)) >= 20, what="requests in flight")
    for s in socks:
        reset(s)
    wait_for(lambda: st.server.conn_count == 0, what="reset connections to be dropped")
    assert server_logs.errors() == []
    assert_thread_alive(st, framing="line")


@pytest.mark.parametrize("framing", ["raw", "line", "length"])
def test_random_bytes_on_every_framing(serve: Serve, server_logs: LogTap, framing: str) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", framing=framing, max_message=512)
    addr = addr_of(st.url("tcp"))
    rng = random.Random(f"garbage-{framing}")
    for i in range(30):
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(rng.randbytes(rng.randint(1, 4096)))
            if i % 2:
                reset(s)
            else:
                s.shutdown(socket.SHUT_WR)
                assert closed_by_peer(s), "server kept a half-closed garbage connection open"
    wait_for(lambda: st.server.conn_count == 0, what="garbage connections to close")
    assert server_logs.errors() == []
    assert_thread_alive(st, framing=framing)


def test_random_datagrams(serve: Serve, server_logs: LogTap) -> None:
    st = serve("timestamp", "udp://127.0.0.1:0")
    rng = random.Random("garbage-udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for _ in range(100):
            s.sendto(rng.randbytes(rng.randint(0, 2048)), addr_of(st.url("udp")))
    assert server_logs.errors() == []
    assert_thread_alive(st, "udp")


# -- a handler that raises -------------------------------------------------------------------


@pytest.mark.parametrize("handler", [picky, apicky], ids=["sync", "async"])
@pytest.mark.parametrize("framing", ["raw", "line"])
def test_raising_handler_closes_only_that_connection(
    serve: Serve, server_logs: LogTap, handler: Any, framing: str
) -> None:
    st = serve(handler, "tcp://127.0.0.1:0", framing=framing)
    url = st.url("tcp")
    with sockserve.connect(url, framing=framing, timeout=5) as bystander:
        assert bystander.request(b"before") == b"ok before"
        with socket.create_connection(addr_of(url), timeout=5) as s:
            s.sendall(b"boom\n" if framing == "line" else b"boom")
            assert closed_by_peer(s), "the failing request's connection stayed open"
        server_logs.wait_for("raised on tcp://127.0.0.1")
        (record,) = [r for r in server_logs.records if "raised on" in r.getMessage()]
        assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
        assert "boom requested by the test" in str(record.exc_info[1])
        assert bystander.request(b"after") == b"ok after", "another client was harmed"
    assert_thread_alive(st, framing=framing)


@pytest.mark.parametrize("handler", [picky, apicky], ids=["sync", "async"])
def test_raising_handler_drops_that_datagram(
    serve: Serve, server_logs: LogTap, handler: Any
) -> None:
    st = serve(handler, "udp://127.0.0.1:0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect(addr_of(st.url("udp")))
        s.send(b"boom")
        server_logs.wait_for("raised on udp://127.0.0.1")
        s.send(b"hello")
        assert s.recv(1024) == b"ok hello", "a reply came for the failed datagram"
    (record,) = [r for r in server_logs.records if "raised on" in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert_thread_alive(st, "udp")


# -- UDP reflection guards -------------------------------------------------------------------


def _privileged_udp_socket() -> socket.socket:
    """Port 1023, the highest privileged one: free in the test's own network namespace."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 1023))
    return s


@needs_root
def test_udp_from_a_privileged_source_port_is_dropped(netns: str, serve: Serve) -> None:
    st = serve("timestamp", "udp://127.0.0.1:0")
    addr = addr_of(st.url("udp"))
    with _privileged_udp_socket() as s:
        s.settimeout(0.5)
        s.sendto(b"reflect me", addr)
        with pytest.raises(TimeoutError):
            s.recvfrom(1024)
        # The counterfactual: with the guard lowered, the same socket is answered.
        relaxed = serve("timestamp", "udp://127.0.0.1:0", udp_min_source_port=0)
        s.settimeout(5)
        s.sendto(b"reflect me", addr_of(relaxed.url("udp")))
        assert s.recvfrom(1024)[0].endswith(b"reflect me")
    assert st.server.datagrams[0].dropped == 1
    assert_thread_alive(st, "udp")


def test_udp_flood_from_one_source_is_rate_limited_per_source(serve: Serve) -> None:
    rate = 50
    st = serve("timestamp", "udp://127.0.0.1:0", udp_rate=rate)
    addr = addr_of(st.url("udp"))
    drt = st.server.datagrams[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
        flood.settimeout(5)
        start = time.monotonic()
        sent = 0
        while sent < 3000:
            flood.sendto(b"f", addr)
            sent += 1
        # Every datagram is either answered or dropped by the guard: wait until all are seen.
        wait_for(lambda: drt.dropped > 0, what="the rate guard to drop")
        elapsed = time.monotonic() - start
        replies = 0
        flood.settimeout(0.2)
        try:
            while True:
                flood.recvfrom(1024)
                replies += 1
        except TimeoutError:
            pass
        elapsed = time.monotonic() - start
        # A bucket of `rate` tokens refilled at `rate`/s: never more than this many replies.
        assert replies <= rate + rate * elapsed + 1, f"{replies} replies in {elapsed:.2f}s"
        # Another source is not throttled by the flood.
        with sockserve.connect(st.url("udp"), timeout=5, source=("127.0.0.2", 0)) as other:
            assert other.request(b"other").endswith(b"other")
        # And the flooder is served again once its bucket refills.
        with sockserve.connect(st.url("udp"), timeout=5) as again:
            assert again.request(b"later").endswith(b"later")


def test_udp_rate_guard_defaults_off_on_loopback_and_on_elsewhere(netns: str, serve: Serve) -> None:
    """A non-loopback bind (192.0.2.1 in the test's own namespace) limits each source to
    100 datagrams/s by default; loopback is never throttled."""
    lo = serve("timestamp", "udp://127.0.0.1:0")
    wide = serve("timestamp", f"udp://{netns}:0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((netns, 0))
        start = time.monotonic()
        for i in range(400):
            s.sendto(b"%d" % i, addr_of(wide.url("udp")))
        replies = 0
        s.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            while True:
                s.recvfrom(1024)
                replies += 1
        elapsed = time.monotonic() - start
        assert 1 <= replies <= 100 + 100 * elapsed + 1, f"{replies} replies in {elapsed:.2f}s"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for i in range(300):  # in lockstep, so no loss: loopback is never throttled
            s.sendto(b"%d" % i, addr_of(lo.url("udp")))
            assert s.recvfrom(1024)[0].endswith(b"%d" % i)


# -- the listen backlog --------------------------------------------------------------------


def test_a_burst_of_connects_completes_in_the_backlog_while_the_server_is_full(
    serve: Serve,
) -> None:
    """With the server paused at --max-conns, 2000 connects still complete in the kernel's
    queue: a small backlog would leave most in SYN retries (1 s, 3 s, 7 s...)."""
    st = serve("timestamp", "tcp://127.0.0.1:0", max_conns=1)
    addr = addr_of(st.url("tcp"))
    holder = sockserve.connect(st.url("tcp"), timeout=5)
    assert holder.request(b"hold").endswith(b"hold")
    burst: list[socket.socket] = []
    poller = select.poll()
    try:
        for _ in range(2000):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(addr)
            burst.append(s)
            poller.register(s, select.POLLOUT)
        pending = {s.fileno() for s in burst}
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                poller.unregister(fd)
                pending.discard(fd)
        assert not pending, f"{len(pending)} of 2000 connects still not established"
        errors = [s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) for s in burst]
        assert errors == [0] * len(burst), "some connects failed"
        assert st.server.conn_count == 1
    finally:
        for s in burst:
            s.close()
        holder.close()
    assert_thread_alive(st)


# -- structured logs -------------------------------------------------------------------------


def test_json_logs_one_object_per_line_for_each_event() -> None:
    with ServerProcess(
        "fault_services:raising",
        "--listen",
        "tcp://127.0.0.1:0",
        "--framing",
        "line",
        "--max-message",
        "16",
        "--log-format",
        "json",
    ) as srv:
        url = srv.url("tcp")
        assert_alive(url, "line", payload=b"fine")
        with socket.create_connection(addr_of(url), timeout=5) as s:
            s.sendall(b"x" * 100 + b"\n")
            assert closed_by_peer(s)
        with socket.create_connection(addr_of(url), timeout=5) as s:
            s.sendall(b"boom\n")
            assert closed_by_peer(s)
        srv.wait_line('"handler_error"')
        srv.wait_line('"close"', count=3)
        records = [json.loads(line) for line in srv.lines]  # every line is one JSON object
    events = [r.get("event") for r in records]
    for event in ("listening", "open", "close", "handler_error"):
        assert event in events, f"no {event!r} event in {events}"
    closes = [r for r in records if r.get("event") == "close"]
    assert all(r["endpoint"] == url and r["peer"].startswith("127.0.0.1:") for r in closes)
    assert any(r["reason"].startswith("protocol error: line") for r in closes), closes
    (failure,) = [r for r in records if r.get("event") == "handler_error"]
    assert failure["level"] == "error"
    assert "RuntimeError: boom requested by the test" in failure["traceback"]


def test_udp_flood_to_a_slow_async_handler_holds_a_bounded_number_of_requests(
    serve: Serve,
) -> None:
    release = threading.Event()

    async def stuck(request: bytes, ctx: sockserve.Context) -> bytes:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return request

    st = serve(stuck, "udp://127.0.0.1:0")
    drt = st.server.datagrams[0]
    sent = 0
    try:
        # From many sources (kept open, so none reuses another's port): one source alone
        # may hold only its share of the cap (see test_datagram).
        with contextlib.ExitStack() as sources:
            while sent < MAX_DATAGRAM_INFLIGHT + 500:
                s = sources.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                for _ in range(50):  # small batches, so the kernel buffer never drops them
                    s.sendto(b"flood", addr_of(st.url("udp")))
                sent += 50

                def landed(n: int = sent) -> bool:  # n: this batch's total, bound now
                    return len(drt.inflight) + drt.dropped >= n

                wait_for(landed, what="the batch")
        assert len(drt.inflight) == MAX_DATAGRAM_INFLIGHT
        assert drt.dropped == sent - MAX_DATAGRAM_INFLIGHT
    finally:
        release.set()
    wait_for(lambda: not drt.inflight, what="the held requests to finish")
    with sockserve.connect(st.url("udp"), timeout=5) as c:
        assert c.request(b"alive") == b"alive"
