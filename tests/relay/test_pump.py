"""The relay's pump (relay/pump.py): plain pairs joined on the server's epoll hub, with the
C helper's poll and with its pure-Python twin (``build``), through a real Relay.

What it must keep of the relay's behaviour: bytes both ways and counted, half-close both
ways, a reset passes as a reset, backpressure (a target that never reads stops the
client, bounded), a target that is down resets the client (logged), bulk through splice
intact, and the session path (not the pump) where a toxic is configured.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from strict import require
from support import free_port, wait_for

from sockserve._engine import epoll

try:
    from sockserve import _speedups
except ImportError:  # not built: CI (CI=true) fails the C side instead of skipping
    _speedups = None  # type: ignore[assignment]
from sockserve.relay import RelayThread
from sockserve.relay.pump import Pump
from sockserve.relay.toxics import Toxic
from sockserve.server import ServerThread

TIMEOUT = 10


@pytest.fixture(params=["c", "py"])
def build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which poll the relay's hub runs: the C helper's (also under SOCKSERVE_PURE_PYTHON,
    where it is built), or its twin (as without it)."""
    if request.param == "py":
        monkeypatch.setattr(epoll, "c_poll_fast", None)
    else:
        require(_speedups is not None, "sockserve._speedups is not built")
        monkeypatch.setattr(epoll, "c_poll_fast", _speedups.poll_fast)
    return str(request.param)


def conns_of(r: RelayThread) -> list[Any]:
    server = r.relay.server
    assert server is not None
    return [c for rt in server.streams for c in rt.conns]


class Target:
    """A textbook target: accepts on loopback; each accepted socket is handed to the test."""

    def __init__(self, family: int = socket.AF_INET, path: str = "") -> None:
        self.lsock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            self.lsock.bind(path)
            self.url = f"unix://{path}"
        else:
            self.lsock.bind(("127.0.0.1", 0))
            self.url = f"tcp://127.0.0.1:{self.lsock.getsockname()[1]}"
        self.lsock.listen()
        self.lsock.settimeout(TIMEOUT)

    def accept(self) -> socket.socket:
        sock, _ = self.lsock.accept()
        sock.settimeout(TIMEOUT)
        return sock

    def close(self) -> None:
        self.lsock.close()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.close()


def connect(r: RelayThread) -> socket.socket:
    ep = r.endpoints[0]
    if ep.is_unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(str(ep.address()))
        return s
    return socket.create_connection(("127.0.0.1", ep.port), timeout=TIMEOUT)


def recv_until_eof(s: socket.socket) -> bytes:
    got = bytearray()
    while chunk := s.recv(1 << 20):
        got += chunk
    return bytes(got)


def test_bytes_both_ways_are_pumped_and_counted(build: str, target: Target) -> None:
    with RelayThread("tcp://127.0.0.1:0", target.url) as r:
        c = connect(r)
        t = target.accept()
        c.sendall(b"ping")
        assert t.recv(100) == b"ping"
        t.sendall(b"pong!")
        assert c.recv(100) == b"pong!"
        (pump,) = conns_of(r)
        assert isinstance(pump, Pump)  # the pump, not the session's transports
        wait_for(lambda: pump.active and (r.stats.bytes_up, r.stats.bytes_down) == (4, 5))
        c.close()
        t.close()
        wait_for(lambda: r.stats.open == 0, TIMEOUT, "the pumped connection to end")
        assert r.stats.connections == 1


@pytest.mark.parametrize("kinds", ["tcp-unix", "unix-tcp"])
def test_unix_either_side(build: str, sock_dir: Path, kinds: str) -> None:
    if kinds == "tcp-unix":
        tgt, listen = Target(socket.AF_UNIX, str(sock_dir / "t.sock")), "tcp://127.0.0.1:0"
    else:
        tgt, listen = Target(), f"unix://{sock_dir / 'l.sock'}"
    try:
        with RelayThread(listen, tgt.url) as r:
            c = connect(r)
            t = tgt.accept()
            c.sendall(b"over unix")
            assert t.recv(100) == b"over unix"
            t.sendall(b"back")
            assert c.recv(100) == b"back"
            assert isinstance(conns_of(r)[0], Pump)
            c.close()
            t.close()
    finally:
        tgt.close()


def test_half_close_passes_both_ways(build: str, target: Target) -> None:
    with RelayThread("tcp://127.0.0.1:0", target.url) as r:
        # The client ends first; the target's reply still arrives.
        c = connect(r)
        t = target.accept()
        c.sendall(b"request")
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(t) == b"request"
        t.sendall(b"reply after your FIN")
        t.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c) == b"reply after your FIN"
        c.close()
        t.close()
        # The target ends first; the client may still send.
        c = connect(r)
        t = target.accept()
        t.sendall(b"banner")
        t.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c) == b"banner"
        c.sendall(b"still talking")
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(t) == b"still talking"
        c.close()
        t.close()
        wait_for(lambda: r.stats.open == 0, TIMEOUT, "both connections to end")


def _reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@pytest.mark.parametrize("who", ["target", "client"])
def test_a_reset_passes_as_a_reset(build: str, target: Target, who: str) -> None:
    with RelayThread("tcp://127.0.0.1:0", target.url) as r:
        c = connect(r)
        t = target.accept()
        c.sendall(b"x")
        assert t.recv(10) == b"x"
        gone, other = (t, c) if who == "target" else (c, t)
        _reset(gone)
        with pytest.raises(ConnectionResetError):
            other.recv(10)
        other.close()
        wait_for(lambda: r.stats.open == 0, TIMEOUT, "the reset connection to end")
        assert r.stats.errors == {f"{who}_reset": 1}  # as the session path counts it


@pytest.mark.parametrize("splice", ["1", "0"])
def test_a_target_that_never_reads_stops_the_client(
    build: str, target: Target, splice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure: the client can put only the kernel buffers' worth (and one read held
    by the pump, or a pipe's worth) in flight, not more: the relay's memory does not grow."""
    monkeypatch.setenv("SOCKSERVE_RELAY_SPLICE", splice)
    with RelayThread("tcp://127.0.0.1:0", target.url) as r:
        c = connect(r)
        t = target.accept()  # never reads
        c.setblocking(False)
        chunk = b"\0" * 65536
        sent = idle = 0
        while idle < 20 and sent < 512 << 20:
            try:
                sent += c.send(chunk)
                idle = 0
            except BlockingIOError:
                idle += 1  # give the relay time to pass on what it can
                threading.Event().wait(0.02)
        assert sent < 128 << 20, f"{sent} bytes taken by a relay whose target never reads"
        (pump,) = conns_of(r)
        held = [len(e.out or b"") + e.peer.view[4] for e in (pump.client, pump.target)]
        assert sum(held) <= 1 << 20
        # Once the target reads, everything arrives.
        c.setblocking(True)
        c.shutdown(socket.SHUT_WR)
        assert len(recv_until_eof(t)) == sent
        c.close()
        t.close()


def test_bulk_goes_through_splice_intact(build: str) -> None:
    with (
        ServerThread("echo", "tcp://127.0.0.1:0") as echo,
        RelayThread("tcp://127.0.0.1:0", echo.url("tcp")) as r,
    ):
        c = connect(r)
        data = os.urandom(6 << 20)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(recv_until_eof(c)))
        reader.start()
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        reader.join(TIMEOUT * 3)
        assert got == [data]
        c.close()
        wait_for(lambda: r.stats.open == 0, TIMEOUT, "the bulk connection to end")
        assert r.stats.bytes_up == r.stats.bytes_down == len(data)


def test_a_target_that_is_down_resets_the_client(
    build: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    caplog.set_level(logging.WARNING, "sockserve.relay")
    with RelayThread("tcp://127.0.0.1:0", f"tcp://127.0.0.1:{port}") as r:
        c = connect(r)
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
            if c.recv(10) == b"":
                raise ConnectionAbortedError("closed, not reset")
        wait_for(lambda: r.stats.errors.get("connect") == 1, TIMEOUT, "the connect error")
        c.close()
    lines = [m.getMessage() for m in caplog.records if "cannot connect" in m.getMessage()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0]


def test_a_relay_with_toxics_uses_the_session_path(build: str, target: Target) -> None:
    with RelayThread("tcp://127.0.0.1:0", target.url, toxics=[Toxic("latency")]) as r:
        c = connect(r)
        t = target.accept()
        c.sendall(b"hi")
        assert t.recv(10) == b"hi"
        assert not any(isinstance(conn, Pump) for conn in conns_of(r))
        c.close()
        t.close()


def test_idle_timeout_closes_a_pumped_connection(build: str, target: Target) -> None:
    with RelayThread("tcp://127.0.0.1:0", target.url, idle_timeout=0.3) as r:
        c = connect(r)
        t = target.accept()
        c.sendall(b"hi")
        assert t.recv(10) == b"hi"
        assert c.recv(10) == b""  # closed by the relay once idle
        assert t.recv(10) == b""
        c.close()
        t.close()


def test_a_toxic_added_live_applies_to_a_pumped_connection(build: str, target: Target) -> None:
    """Toxiproxy applies a new toxic to open connections: the pump hands both directions
    to StreamPipes, which then follow the set (removed again: no more latency added)."""
    with RelayThread("tcp://127.0.0.1:0", target.url) as r:
        c = connect(r)
        t = target.accept()

        def round_trip(data: bytes) -> float:
            started = time.perf_counter()
            c.sendall(data)
            assert t.recv(100) == data
            t.sendall(data[::-1])
            assert c.recv(100) == data[::-1]
            return time.perf_counter() - started

        assert round_trip(b"before") < 0.5
        (pump,) = conns_of(r)
        r.call(r.toxics.add, Toxic("latency", attributes={"latency": 150}))
        wait_for(lambda: pump.piped, TIMEOUT, "the pump to hand over to the pipes")
        assert round_trip(b"with latency") >= 0.14
        r.call(r.toxics.remove, "latency_downstream")
        wait_for(lambda: not len(r.toxics), TIMEOUT, "the toxic to go")
        assert round_trip(b"after") < 0.14 + 0.5  # the pipe follows the set
        c.shutdown(socket.SHUT_WR)
        assert t.recv(10) == b""
        t.close()
        assert c.recv(10) == b""
        c.close()
        wait_for(lambda: r.stats.open == 0, TIMEOUT, "the connection to end")
        assert r.stats.bytes_up == len(b"before" + b"with latency" + b"after")
