"""The hot-path socket I/O (``sockserve/_engine/fastio.py``): the C helper and the pure-Python
fallback must keep the same contract, on real loopback sockets."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from faultkit import closed_by_peer
from strict import ipv6_loopback_error, needs, require
from support import ServerProcess, addr_of

from sockserve._engine import fastio, fastpath

try:
    from sockserve import _speedups
except ImportError:  # not built here (no compiler): the fallback is still tested
    _speedups = None  # type: ignore[assignment]

# The C variants skip only where the helper was not built; under CI=true (CI builds it,
# SOCKSERVE_REQUIRE_SPEEDUPS) a missing helper fails them.
needs_c = needs(_speedups is not None, "sockserve._speedups is not built")


class Impl:
    """One implementation of the contract, called the way the server calls it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def batch(self, sock: socket.socket) -> tuple[Any, Any, Any]:
        if self.name == "c":
            assert _speedups is not None
            return sock.fileno(), _speedups.recv_batch, _speedups.send_batch
        return sock, fastio.recv_loop, fastio.send_loop

    def stream(self) -> tuple[Any, Any]:
        if self.name == "c":
            assert _speedups is not None
            return _speedups.recv, _speedups.send
        return fastio.py_recv, fastio.py_send

    def recv_into(self) -> Any:
        if self.name == "c":
            assert _speedups is not None
            return _speedups.recv_into
        return fastio.readv_into

    def poll(self, ep: Any, maxevents: int, fast: dict[int, Any]) -> Any:
        if self.name == "c":
            assert _speedups is not None
            return _speedups.poll_fast(ep.fileno(), maxevents, fast)
        return fastpath.poll_fast(ep, maxevents, fast)


@pytest.fixture(params=["c", "python"])
def impl(request: pytest.FixtureRequest) -> Impl:
    if request.param == "c":
        require(_speedups is not None, "sockserve._speedups is not built")
    return Impl(request.param)


def _udp(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(5)
    return s


@pytest.fixture
def server() -> Iterator[socket.socket]:
    s = _udp()
    s.setblocking(False)
    yield s
    s.close()


def _wait_readable(sock: socket.socket) -> None:
    import select

    assert select.select([sock], [], [], 5)[0], "nothing arrived within 5 s"


def test_recv_batch_empty_raises_blocking(impl: Impl, server: socket.socket) -> None:
    target, recv, _ = impl.batch(server)
    with pytest.raises(BlockingIOError):
        recv(target, 8, 2048)


def test_batch_round_trip_keeps_data_and_addresses(impl: Impl, server: socket.socket) -> None:
    target, recv, send = impl.batch(server)
    clients = [_udp() for _ in range(3)]
    try:
        sent = []
        for i, c in enumerate(clients):
            for j in range(2):
                msg = bytes([i, j]) * (10 + i)
                c.sendto(msg, server.getsockname())
                sent.append((msg, c.getsockname()))
        got: list[tuple[bytes, Any]] = []
        while len(got) < len(sent):
            _wait_readable(server)
            got += recv(target, 64, 2048)
        assert sorted(got) == sorted(sent)
        assert send(target, [(b"re:" + data, addr) for data, addr in got]) is None
        for c in clients:
            replies = {c.recvfrom(2048)[0] for _ in range(2)}
            assert all(r.startswith(b"re:") for r in replies)
            assert len(replies) == 2
    finally:
        for c in clients:
            c.close()


def test_recv_batch_takes_at_most_count(impl: Impl, server: socket.socket) -> None:
    target, recv, _ = impl.batch(server)
    with _udp() as c:
        for i in range(5):
            c.sendto(b"%d" % i, server.getsockname())
        _wait_readable(server)
        first = recv(target, 2, 2048)
        assert 1 <= len(first) <= 2
        rest: list[tuple[bytes, Any]] = []
        while len(first) + len(rest) < 5:
            _wait_readable(server)
            rest += recv(target, 64, 2048)
        assert [d for d, _ in first + rest] == [b"0", b"1", b"2", b"3", b"4"]


def test_long_datagram_is_cut_to_size_like_recvfrom(impl: Impl, server: socket.socket) -> None:
    target, recv, _ = impl.batch(server)
    with _udp() as c:
        c.sendto(b"x" * 3000, server.getsockname())
        c.sendto(b"after", server.getsockname())
        got: list[tuple[bytes, Any]] = []
        while len(got) < 2:
            _wait_readable(server)
            got += recv(target, 8, 1000)
    assert [d for d, _ in got] == [b"x" * 1000, b"after"]


def test_ipv6_addresses_match_the_socket_module(impl: Impl) -> None:
    require(ipv6_loopback_error() is None, str(ipv6_loopback_error()))
    srv = _udp("::1")
    srv.setblocking(False)
    target, recv, send = impl.batch(srv)
    with srv, _udp("::1") as c:
        c.sendto(b"six", srv.getsockname())
        _wait_readable(srv)
        [(data, addr)] = recv(target, 8, 2048)
        assert data == b"six"
        assert addr == c.getsockname()  # (host, port, flowinfo, scope_id)
        assert send(target, [(b"back", addr)]) is None
        assert c.recvfrom(2048)[0] == b"back"


def test_one_refused_datagram_does_not_stop_the_rest(impl: Impl, server: socket.socket) -> None:
    """A reply the kernel refuses (too long for UDP) is reported by index; the others go."""
    target, _, send = impl.batch(server)
    with _udp() as c:
        addr = c.getsockname()
        failed = send(target, [(b"one", addr), (b"x" * 70000, addr), (b"three", addr)])
        assert failed == [(1, errno.EMSGSIZE)]
        assert [c.recvfrom(2048)[0] for _ in range(2)] == [b"one", b"three"]


def test_send_batch_rejects_what_is_not_bytes(impl: Impl, server: socket.socket) -> None:
    target, _, send = impl.batch(server)
    with pytest.raises(TypeError):
        send(target, [("text", ("127.0.0.1", 9))])


def test_stream_recv_send_contract(impl: Impl) -> None:
    recv, send = impl.stream()
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        with pytest.raises(BlockingIOError):
            recv(a.fileno(), 1024)
        assert send(a.fileno(), b"ping") == 4
        assert b.recv(16) == b"ping"
        b.sendall(b"pong" * 100)
        assert recv(a.fileno(), 8) == b"pongpong"  # at most size bytes
        assert recv(a.fileno(), 4096) == b"pong" * 98
        b.close()
        assert recv(a.fileno(), 1024) == b""  # end of stream
        with pytest.raises(OSError) as info:  # EPIPE, not a SIGPIPE that kills the process
            for _ in range(3):
                send(a.fileno(), b"x")
        assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)


def test_stream_recv_into_fills_the_buffer(impl: Impl) -> None:
    recv_into = impl.recv_into()
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        buf = bytearray(8)
        with pytest.raises(BlockingIOError):
            recv_into(a.fileno(), buf)
        b.sendall(b"0123456789")
        assert recv_into(a.fileno(), buf) == 8
        assert buf == b"01234567"
        assert recv_into(a.fileno(), buf) == 2
        assert buf[:2] == b"89"
        b.close()
        assert recv_into(a.fileno(), buf) == 0
    with pytest.raises(OSError) as info:
        recv_into(-1, buf)
    assert info.value.errno == errno.EBADF


def test_stream_calls_on_a_closed_descriptor_raise_ebadf(impl: Impl) -> None:
    recv, send = impl.stream()
    with pytest.raises(OSError) as info:
        recv(-1, 16)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        send(-1, b"x")
    assert info.value.errno == errno.EBADF


@needs_c
def test_c_helper_validates_its_arguments(server: socket.socket) -> None:
    assert _speedups is not None
    fd = server.fileno()
    with pytest.raises(ValueError, match="count"):
        _speedups.recv_batch(fd, 0, 2048)
    with pytest.raises(ValueError, match="count"):
        _speedups.recv_batch(fd, _speedups.MAX_BATCH + 1, 2048)
    with pytest.raises(ValueError, match="size"):
        _speedups.recv_batch(fd, 8, _speedups.MAX_SIZE + 1)
    # Arguments of the wrong type on purpose (Any): the C side must refuse them.
    no_address: Any = b"no address"
    text: Any = "text"
    read_only: Any = b"read-only"
    with pytest.raises(TypeError, match="item 0"):
        _speedups.send_batch(fd, [no_address])
    with pytest.raises(ValueError, match="numeric"):
        _speedups.send_batch(fd, [(b"x", ("localhost", 9))])
    with pytest.raises(OverflowError, match="port"):
        _speedups.send_batch(fd, [(b"x", ("127.0.0.1", 70000))])
    with pytest.raises(TypeError, match="bytes"):
        _speedups.send(fd, text)
    with pytest.raises(BufferError):
        _speedups.recv_into(fd, read_only)


@needs_c
def test_c_helper_sends_more_than_one_kernel_batch(server: socket.socket) -> None:
    """Past MAX_BATCH items, send_batch goes on in further sendmmsg calls."""
    assert _speedups is not None
    n = _speedups.MAX_BATCH + 10
    with _udp() as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        addr = c.getsockname()
        assert _speedups.send_batch(server.fileno(), [(b"%d" % i, addr) for i in range(n)]) is None
        assert [c.recvfrom(64)[0] for _ in range(n)] == [b"%d" % i for i in range(n)]


def test_ci_builds_the_c_helper() -> None:
    """CI sets SOCKSERVE_REQUIRE_SPEEDUPS: there the fast path must really be tested."""
    require(os.environ.get("SOCKSERVE_REQUIRE_SPEEDUPS"), "SOCKSERVE_REQUIRE_SPEEDUPS is not set")
    assert _speedups is not None, "sockserve._speedups was not built"
    assert fastio.HAVE_SPEEDUPS


@pytest.mark.parametrize("pure", ["0", "1"])
def test_server_answers_with_and_without_the_helper(pure: str) -> None:
    """The whole server, TCP and UDP, with the helper and with SOCKSERVE_PURE_PYTHON."""
    # Empty counts as unset, so the helper's case holds even when the whole run sets it.
    env = {"SOCKSERVE_PURE_PYTHON": "1" if pure == "1" else ""}
    version = subprocess.run(
        [sys.executable, "-m", "sockserve", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
        check=True,
    ).stdout
    assert ("C speedups: on" in version) == (pure == "0" and _speedups is not None)
    with ServerProcess(
        "--listen", "tcp://127.0.0.1:0", "--listen", "udp://127.0.0.1:0", env=env, ready=2
    ) as srv:
        tcp_url, udp_url = sorted(srv.endpoints)
        host, port = tcp_url.split("//")[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as t:
            for i in range(50):
                t.sendall(b"tcp %d" % i)
                assert t.recv(1024).endswith(b"] tcp %d" % i)
        host, port = udp_url.split("//")[1].rsplit(":", 1)
        with _udp() as u:
            for i in range(50):
                u.sendto(b"udp %d" % i, (host, int(port)))
                assert u.recvfrom(1024)[0].endswith(b"] udp %d" % i)


@pytest.mark.parametrize("pure", ["0", "1"])
def test_every_exit_of_the_raw_fast_path(pure: str) -> None:
    """Raw framing and a sync handler: answered inside the C helper's poll, except where
    the handler raises, returns nothing or not bytes (an exception object included), the
    reply does not fit the socket buffer, or the chunk is longer than one request may be.
    Each case must end as the pure-Python path ends it, and the server must go on serving."""
    env = {"SOCKSERVE_PURE_PYTHON": "1" if pure == "1" else ""}
    with ServerProcess(
        "fault_services:every_outcome",
        "--listen",
        "tcp://127.0.0.1:0",
        "--max-message",
        "1000",
        env=env,
    ) as srv:
        addr = addr_of(srv.endpoints[0])
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(b"hello")
            assert s.recv(100) == b"ok hello"
            s.sendall(b"none")  # no reply, connection kept
            s.settimeout(0.3)  # an absence: nothing may come within a bound
            with pytest.raises(TimeoutError):
                s.recv(100)
            s.settimeout(5)
            s.sendall(b"again")
            assert s.recv(100) == b"ok again"
            s.sendall(b"big")  # 4 MiB: partly sent, the rest held and flushed later
            got = 0
            while got < 4 << 20:
                chunk = s.recv(1 << 16)
                assert chunk, "closed before the whole reply came"
                got += len(chunk)
            assert got == 4 << 20
            s.sendall(b"after big")
            assert s.recv(100) == b"ok after big"
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(b"boom")  # the handler raised: logged, that connection closed
            assert closed_by_peer(s)
        srv.wait_line("boom requested by the test")
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(b"str")  # not bytes: logged, that connection closed
            assert closed_by_peer(s)
        srv.wait_line("not bytes")
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(b"exception")  # an exception object returned: not bytes either
            assert closed_by_peer(s), "a returned exception object left the connection open"
        srv.wait_line("returned KeyboardInterrupt, not bytes")
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(b"y" * 5000)  # longer than --max-message: raw splits it into 5 requests
            want = (b"ok " + b"y" * 1000) * 5
            got_bytes = b""
            while len(got_bytes) < len(want):
                chunk = s.recv(1 << 16)
                assert chunk, "closed before all five replies came"
                got_bytes += chunk
            assert got_bytes == want
        for _ in range(3):  # a reset arrives as recv's errno
            s = socket.create_connection(addr, timeout=5)
            s.sendall(b"hi")
            assert s.recv(100) == b"ok hi"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(b"still")
            assert s.recv(100) == b"ok still"


def test_a_slow_handler_does_not_hold_a_batchs_replies(serve: Any) -> None:
    """Replies of one datagram batch go out together, but a slow sync handler must not
    make the first client wait for the whole batch: 20 datagrams queued at once (while
    the server is held in a handler), 5 ms of handling each; the first reply must come
    while most are still unhandled."""
    import threading
    import time

    handled = 0
    lock = threading.Lock()
    entered, release = threading.Event(), threading.Event()

    def slow(request: bytes, ctx: Any) -> bytes:
        nonlocal handled
        if request == b"gate":
            entered.set()
            release.wait(10)  # holds the server so the next datagrams queue up
            return b"opened"
        time.sleep(0.005)
        with lock:
            handled += 1
        return b"done " + request

    st = serve(slow, "udp://127.0.0.1:0")
    host, port = addr_of(st.url("udp"))
    clients = [_udp() for _ in range(20)]
    try:
        with _udp() as gate:
            gate.sendto(b"gate", (host, port))
            assert entered.wait(5)
            for i, c in enumerate(clients):
                c.sendto(b"%d" % i, (host, port))
            release.set()
            assert gate.recvfrom(100)[0] == b"opened"
        first = clients[0].recvfrom(100)[0]
        with lock:
            handled_then = handled
        assert first == b"done 0"
        assert handled_then < 15, f"the first reply waited for {handled_then} of 20 handlers"
        for i, c in enumerate(clients[1:], 1):
            assert c.recvfrom(100)[0] == b"done %d" % i
    finally:
        release.set()
        for c in clients:
            c.close()


class _Member:
    """Stands in for a FastStream: the one attribute the fast path writes on one."""

    def __init__(self) -> None:
        self.active = False


def test_poll_fast_serves_and_hands_back(impl: Impl) -> None:
    """poll_fast on real sockets, C and its twin alike: a plain request is answered
    inside; a reply whose connection left ``fast`` meanwhile (closed by the handler's
    code) is handed back, not sent to whoever has the fd now; what the handler raised
    (even after closing its own connection) or returned comes back tagged for its member."""
    import select

    ep = select.epoll()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for a, _ in pairs:
            a.setblocking(False)
            ep.register(a.fileno(), select.EPOLLIN)
        (a0, b0), (a1, b1), (a2, b2) = pairs
        m0, m1, m2 = _Member(), _Member(), _Member()
        fast: dict[int, Any] = {}

        def handler(request: bytes, ctx: Any) -> bytes | BaseException:
            if request.startswith(b"close me"):
                fast.pop(a1.fileno(), None)  # what FastStream._finish does (hub.remove)
            if request.endswith(b"interrupt"):
                raise KeyboardInterrupt
            if request == b"return one":
                return KeyboardInterrupt()
            return b"re:" + request

        def register() -> None:
            for (a, _), m in zip(pairs, (m0, m1, m2), strict=True):
                fast[a.fileno()] = (m, handler, None, 100, fastio.KIND_RAW)

        register()
        b0.sendall(b"hello")
        b1.sendall(b"close me")
        b2.sendall(b"x" * 500)  # longer than max 100: handed back as bytes
        _wait_readable(a2)
        n, rest, error = impl.poll(ep, 64, fast)
        assert (n, error) == (3, None)
        assert sorted(rest, key=lambda item: item[0]) == sorted(
            [
                (a1.fileno(), fastio.REPLY, b"re:close me", m1),
                (a2.fileno(), fastio.DATA, b"x" * 500, m2),
            ],
            key=lambda item: item[0],
        )
        assert b0.recv(100) == b"re:hello" and m0.active
        b1.setblocking(False)
        with pytest.raises(BlockingIOError):
            b1.recv(100)  # its connection left fast in the handler: nothing sent here
        register()

        # Whatever the handler raises, KeyboardInterrupt too, comes back for its member
        # (the hub tells a real Ctrl-C from the handler's own); the batch goes on.
        b0.sendall(b"interrupt")
        _wait_readable(a0)
        n, rest, error = impl.poll(ep, 64, fast)
        assert n == 1 and error is None
        [(fd, tag, raised, member)] = rest
        assert (fd, tag, member) == (a0.fileno(), fastio.RAISED, m0)
        assert isinstance(raised, KeyboardInterrupt) and raised.__traceback__ is not None
        # An exception object returned is a reply that is not bytes, not a failure.
        b0.sendall(b"return one")
        _wait_readable(a0)
        n, rest, error = impl.poll(ep, 64, fast)
        assert n == 1 and error is None
        [(fd, tag, reply, member)] = rest
        assert (fd, tag, member) == (a0.fileno(), fastio.REPLY, m0)
        assert type(reply) is KeyboardInterrupt
        # Raised after its code closed its own connection: still handed back, never lost.
        b1.sendall(b"close me then interrupt")
        _wait_readable(a1)
        n, rest, error = impl.poll(ep, 64, fast)
        assert n == 1 and error is None
        [(fd, tag, raised, member)] = rest
        assert (fd, tag, member) == (a1.fileno(), fastio.RAISED, m1)
        assert isinstance(raised, KeyboardInterrupt)
        register()
        # End of stream, and an event the fast path does not serve (not only EPOLLIN).
        b2.close()
        _wait_readable(a2)
        n, rest, error = impl.poll(ep, 64, fast)
        assert error is None
        assert [item[:2] for item in rest] == [(a2.fileno(), fastio.EVENT)]
        assert rest[0][2] & select.EPOLLIN and rest[0][3] is None
    finally:
        ep.close()
        for a, b in pairs:
            a.close()
            b.close()


@needs_c
def test_send_batch_takes_numeric_hosts_only(server: socket.socket) -> None:
    assert _speedups is not None

    class Host(str):
        pass

    fd = server.fileno()
    with pytest.raises(TypeError, match="str"):
        _speedups.send_batch(fd, [(b"x", (Host("127.0.0.1"), 9))])
    with pytest.raises(ValueError, match="numeric"):
        _speedups.send_batch(fd, [(b"x", ("127.0.0.1\0junk", 9))])


@needs_c
def test_send_batch_ignores_an_ipv6_zone_suffix() -> None:
    require(ipv6_loopback_error() is None, str(ipv6_loopback_error()))
    srv, c = _udp("::1"), _udp("::1")
    assert _speedups is not None
    with srv, c:
        port = c.getsockname()[1]
        assert _speedups.send_batch(srv.fileno(), [(b"zoned", ("::1%lo", port, 0, 0))]) is None
        assert c.recvfrom(100)[0] == b"zoned"


@pytest.mark.parametrize(("value", "state"), [("0", "C speedups: on"), ("", "C speedups: on")])
def test_pure_python_zero_or_empty_keeps_the_helper(value: str, state: str) -> None:
    """``SOCKSERVE_PURE_PYTHON=0`` means "not pure Python": the helper stays on (it once
    turned it off, because any non-empty value counted)."""
    require(_speedups is not None, "sockserve._speedups is not built")
    version = subprocess.run(
        [sys.executable, "-m", "sockserve", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SOCKSERVE_PURE_PYTHON": value},
        check=True,
    )
    assert state in version.stdout, version.stdout


def test_a_handler_that_polls_again_recurses_into_recursion_error(impl: Impl) -> None:
    """A handler that re-enters poll_fast, again and again, ends in RecursionError
    (an outcome or the batch's error), never a crash: the C frames keep nothing large
    on the stack (once ~23 KiB each, which overflowed the C stack first)."""
    import select

    ep = select.epoll()
    a, b = socket.socketpair()
    entered = 0
    seen: list[BaseException] = []
    try:
        a.setblocking(False)
        ep.register(a.fileno(), select.EPOLLIN)
        member = _Member()
        fast: dict[int, Any] = {}

        def handler(request: bytes, ctx: Any) -> None:
            nonlocal entered
            entered += 1
            b.send(b"again")
            _, items, error = impl.poll(ep, 8, fast)
            seen.extend(value for _, tag, value, _ in items if tag == fastio.RAISED)
            if error is not None:
                seen.append(error)

        fast[a.fileno()] = (member, handler, None, 100, fastio.KIND_RAW)
        b.send(b"go")
        _wait_readable(a)
        n, _, error = impl.poll(ep, 8, fast)
        assert n == 1 and entered > 50
        assert error is None or isinstance(error, RecursionError)
        assert seen and all(isinstance(exc, RecursionError) for exc in seen)
    finally:
        ep.close()
        a.close()
        b.close()
