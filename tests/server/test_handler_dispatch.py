"""Issue 12 items 1-2: how a handler is called.

A ``def`` handler runs inline until one call is seen to block the loop (then, logged
once, in the handler threads); ``blocking``/``nonblocking`` (decorators, or the
``--blocking``/``--nonblocking`` settings) force the choice. While a handler is stuck in a
thread, other clients are answered, replies on one connection keep their order, and
SIGTERM's drain timeout still ends the process. Async handlers leave the hub free to
sleep (no busy-poll held while their tasks run).

The stuck handlers wait on a ``threading.Event`` the test sets (no timing assertions):
"answered while it is still blocked" means the other reply came back before the event
was set. Each case runs on the epoll engine (the C fast path or its twin), on asyncio
transports (``engine="asyncio"``), over TLS and over UDP.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from faultkit import Certs, LogTap
from support import ServerProcess, addr_of, wait_for

import sockserve
from sockserve.server import Server, ServerThread, make_binding

#: A call this long is seen to block (the threshold is 25 ms), on any machine: also when
#: the loop's thread waited for a CPU meanwhile (that time is not counted as blocking).
SLOW = 0.3
TIMEOUT = 10.0
MOVED = "blocked the event loop"


@dataclass
class Way:
    """One way a request reaches the handler: the URL scheme, the server's settings for it,
    and the client's options."""

    scheme: str
    settings: dict[str, Any] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)

    def serve(self, handler: Callable[..., Any], **settings: Any) -> ServerThread:
        url = f"{self.scheme}://127.0.0.1:0"
        return ServerThread(handler, url, **self.settings, **settings)

    def ask(self, url: str, request: bytes) -> bytes:
        return _ask(url, request, **self.client)


class Gate:
    """A handler that blocks on ``b"block"`` until released, naps on ``b"slow"``, and
    answers everything else at once; it records the thread each call ran in."""

    def __init__(self) -> None:
        self.__name__ = "gated"  # the service's name, in the log line
        self.release = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []

    def __call__(self, request: bytes, ctx: sockserve.Context) -> bytes:
        self.threads.append(threading.current_thread().name)
        if request == b"block":
            self.entered.set()
            self.release.wait(TIMEOUT)
        elif request == b"slow":
            time.sleep(SLOW)
        return request.upper()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.release.set()  # never leave a handler thread waiting after a failed test


@pytest.fixture(params=["epoll", "asyncio", "tls", "udp"])
def way(request: pytest.FixtureRequest) -> Way:
    if request.param == "tls":
        certs: Certs = request.getfixturevalue("certs")
        # Line framing: a raw client half-closes, and an SSL transport closes at once on
        # that (asyncio ignores eof_received's "keep open" under TLS), replies in flight lost.
        server = {"tls_cert": certs.server_cert, "tls_key": certs.server_key, "framing": "line"}
        return Way("tls", server, {"tls_ca": certs.ca, "framing": "line"})
    if request.param == "asyncio":
        return Way("tcp", {"engine": "asyncio"})
    return Way("udp" if request.param == "udp" else "tcp")


def _ask(url: str, request: bytes, **client: Any) -> bytes:
    with sockserve.connect(url, timeout=TIMEOUT, **client) as c:
        reply = c.request(request)
    assert reply is not None
    return reply


def _block_in_background(way: Way, url: str, results: list[bytes]) -> threading.Thread:
    t = threading.Thread(target=lambda: results.append(way.ask(url, b"block")), daemon=True)
    t.start()
    return t


def test_a_handler_seen_to_block_moves_to_the_threads_and_others_are_answered(
    gate: Gate, way: Way, server_logs: LogTap
) -> None:
    with way.serve(gate) as srv:
        url = srv.url(way.scheme)
        assert way.ask(url, b"fast") == b"FAST"
        assert server_logs.count(MOVED) == 0
        assert way.ask(url, b"slow") == b"SLOW"  # seen to block: moved from now on
        server_logs.wait_for(MOVED)
        blocked: list[bytes] = []
        t = _block_in_background(way, url, blocked)
        assert gate.entered.wait(TIMEOUT)
        assert way.ask(url, b"other") == b"OTHER"  # while the handler is still blocked
        assert not gate.release.is_set() and not blocked
        gate.release.set()
        t.join(TIMEOUT)
        assert blocked == [b"BLOCK"]
        assert way.ask(url, b"slow") == b"SLOW"
    # Said once, naming the handler; the calls after it ran in the handler threads.
    lines = [m for m in server_logs.messages() if MOVED in m]
    assert len(lines) == 1 and lines[0].startswith("handler gated blocked"), lines
    assert gate.threads[0] == gate.threads[1]  # inline, in the loop's thread
    assert all(name.startswith("sockserve-handler-") for name in gate.threads[2:]), gate.threads


def _forced(way: Way, gate: Gate, how: str, mode: str) -> ServerThread:
    """A server of ``gate`` marked ``mode`` by the decorator of that name, or the setting."""
    if how == "setting":
        return way.serve(gate, **{mode: True})

    def handler(request: bytes, ctx: sockserve.Context) -> bytes:
        return gate(request, ctx)

    return way.serve(getattr(sockserve, mode)(handler))


@pytest.mark.parametrize("how", ["decorator", "setting"])
def test_forced_blocking_goes_straight_to_the_threads(
    gate: Gate, way: Way, how: str, server_logs: LogTap
) -> None:
    with _forced(way, gate, how, "blocking") as srv:
        url = srv.url(way.scheme)
        blocked: list[bytes] = []
        t = _block_in_background(way, url, blocked)  # the very first request
        assert gate.entered.wait(TIMEOUT)
        assert way.ask(url, b"other") == b"OTHER"
        assert not blocked
        gate.release.set()
        t.join(TIMEOUT)
        assert blocked == [b"BLOCK"]
    assert all(name.startswith("sockserve-handler-") for name in gate.threads), gate.threads
    assert server_logs.count(MOVED) == 0  # nothing was moved: it started there


@pytest.mark.parametrize("how", ["decorator", "setting"])
def test_nonblocking_is_never_moved(gate: Gate, way: Way, how: str, server_logs: LogTap) -> None:
    with _forced(way, gate, how, "nonblocking") as srv:
        url = srv.url(way.scheme)
        for _ in range(2):
            assert way.ask(url, b"slow") == b"SLOW"
    assert len(set(gate.threads)) == 1 and not gate.threads[0].startswith("sockserve-handler")
    assert server_logs.count(MOVED) == 0


@pytest.mark.parametrize("engine", ["auto", "asyncio"])
def test_replies_keep_their_order_on_one_connection(engine: str) -> None:
    """Pipelined requests to a handler in the threads, the early ones slower than the
    later: each connection's replies still come back in request order."""
    naps = {b"0": 0.05, b"1": 0.03, b"2": 0.0, b"3": 0.02, b"4": 0.0}

    @sockserve.blocking
    def napper(request: bytes, ctx: sockserve.Context) -> bytes:
        time.sleep(naps.get(request[:1], 0.0))
        return b"re " + request

    with ServerThread(napper, "tcp://127.0.0.1:0", framing="line", engine=engine) as srv:
        requests = [str(i % 5).encode() + b"-" + str(i).encode() for i in range(20)]
        with socket.create_connection(addr_of(srv.url("tcp")), timeout=TIMEOUT) as s:
            s.sendall(b"".join(r + b"\n" for r in requests))
            want = b"".join(b"re " + r + b"\n" for r in requests)
            got = b""
            while len(got) < len(want):
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
    assert got == want


def test_marking_an_async_handler_or_a_bound_method_is_refused() -> None:
    async def coro(request: bytes, ctx: sockserve.Context) -> bytes:
        return request

    with pytest.raises(sockserve.ServiceError, match="async def"):
        sockserve.blocking(coro)
    with pytest.raises(sockserve.ServiceError, match="cannot mark"):
        sockserve.nonblocking(Gate().__call__)
    with pytest.raises(sockserve.ConfigError, match="choose one"):
        sockserve.ServerConfig(blocking=True, nonblocking=True)


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_async_handlers_leave_no_pending_task_on_the_hub(scheme: str) -> None:
    """The hub does not busy-poll while its members' tasks run: the count of those must
    come back to 0 (a leak would turn the busy-poll off for good), also for a handler
    that suspends and one that raises."""

    async def handler(request: bytes, ctx: sockserve.Context) -> bytes:
        if request == b"nap":
            await asyncio.sleep(0.001)
        if request == b"raise":
            raise ValueError("asked to")
        return request

    with ServerThread(handler, f"{scheme}://127.0.0.1:0") as srv:
        url = srv.url(scheme)
        for request in (b"now", b"nap", b"now", b"nap"):
            assert _ask(url, request) == request
        if scheme == "tcp":
            with sockserve.connect(url, timeout=TIMEOUT) as c, pytest.raises(sockserve.ClientError):
                c.request(b"raise")
        hub = srv.server.hub
        assert hub is not None
        wait_for(lambda: hub.pending == 0, TIMEOUT, "the hub's pending tasks to end")


def stuck(request: bytes, ctx: sockserve.Context) -> bytes:
    """The handler of the SIGTERM test (run by ``sockserve serve`` as a module:attr)."""
    import sys

    print("stuck handler entered", file=sys.stderr, flush=True)
    time.sleep(60)
    return request


def test_sigterm_exits_by_the_drain_timeout_with_a_handler_stuck_in_a_thread() -> None:
    """The handler threads are daemons: one stuck in time.sleep(60) cannot keep the
    process alive once the drain timeout has passed, and the loop (free all along)
    finishes the graceful stop itself, without the watchdog."""
    drain = 1.0
    with (
        ServerProcess(
            "server.test_handler_dispatch:stuck",
            "--listen",
            "tcp://127.0.0.1:0",
            "--blocking",
            "--drain-timeout",
            str(drain),
        ) as srv,
        socket.create_connection(addr_of(srv.endpoints[0]), timeout=5) as s,
    ):
        s.sendall(b"hello")
        srv.wait_line("stuck handler entered")
        sent = time.monotonic()
        srv.signal(signal.SIGTERM)
        rc, log = srv.wait(20)
        took = time.monotonic() - sent
    assert rc == 0, log
    assert "drain timeout" in log
    assert "a handler blocks the event loop" not in log  # the loop was free: no watchdog
    assert drain <= took < drain + 5.0, (took, log)


def _roundtrip(sock: socket.socket, request: bytes) -> bytes:
    """One raw request on an open connection (its reply comes in one read: a few bytes)."""
    sock.sendall(request)
    return sock.recv(65536)


def test_a_slow_poll_shared_by_two_handlers_moves_only_the_one_that_blocked(
    server_logs: LogTap,
) -> None:
    """The fast path calls the handlers of several connections in one poll and cannot say
    whose call blocked: both handlers are then timed alone, in Python, and only the one
    seen to block there moves (its second slow call); the other stays inline and is put
    back on the fast path once it has shown it is quick."""
    quick, slow = Gate(), Gate()
    quick.__name__, slow.__name__ = "quick", "slowpoke"
    server = Server(
        make_binding(quick, ["tcp://127.0.0.1:0"]), make_binding(slow, ["tcp://127.0.0.1:0"])
    )
    with ServerThread(server) as srv:
        quick_addr, slow_addr = (addr_of(ep) for ep in srv.endpoints)
        with (
            socket.create_connection(quick_addr, timeout=TIMEOUT) as q,
            socket.create_connection(slow_addr, timeout=TIMEOUT) as s,
        ):
            assert _roundtrip(q, b"hi") == b"HI" and _roundtrip(s, b"hi") == b"HI"
            hub = server.hub
            assert hub is not None and len(hub.fast) == 2
            assert _roundtrip(s, b"slow") == b"SLOW"  # a slow poll: two suspects
            # The reply left inside the poll; the hub takes both off its fast path after it.
            wait_for(lambda: not hub.fast, TIMEOUT, "both handlers timed alone")
            assert server_logs.count(MOVED) == 0
            assert _roundtrip(s, b"slow") == b"SLOW"  # timed alone: this one blocked
            server_logs.wait_for(MOVED)
            for _ in range(40):  # the other is trusted again after its probe
                assert _roundtrip(q, b"hi") == b"HI"
            assert _roundtrip(s, b"after") == b"AFTER"
            back = lambda: [spec[1] for spec in hub.fast.values()] == [quick]  # noqa: E731
            wait_for(back, TIMEOUT, "the quick handler back on the fast path, alone")
    lines = [m for m in server_logs.messages() if MOVED in m]
    assert len(lines) == 1 and lines[0].startswith("handler slowpoke blocked"), lines
    assert all(not name.startswith("sockserve-handler") for name in quick.threads)
    assert slow.threads[-1].startswith("sockserve-handler-")
