"""Graceful shutdown on real sockets: SIGTERM/SIGINT stop accepting at once, in-flight
requests finish and are answered, the process exits 0; --drain-timeout bounds the wait;
a second SIGINT forces exit.

The handler is ``fault_services:gated``: it logs ``gated start`` and then waits for a
release file, so the tests hold requests in flight for exactly as long as they need.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import LoggedServer, addr_of, closed_by_peer
from support import wait_for

import sockserve
from sockserve.server import ServerThread

pytestmark = pytest.mark.timeout(90)

Serve = Callable[..., ServerThread]


def _refused(addr: tuple[str, int]) -> bool:
    try:
        socket.create_connection(addr, timeout=1).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # it was queued as the listener closed: look again
        return False
    return False


def test_sigterm_answers_all_20_in_flight_requests_then_exits_0(tmp_path: Path) -> None:
    gate = tmp_path / "release"
    env = {"FAULT_GATE": str(gate)}
    with LoggedServer(
        "fault_services:gated", "--listen", "tcp://127.0.0.1:0", "--framing", "line", env=env
    ) as srv:
        addr = srv.addr("tcp")
        clients = [socket.create_connection(addr, timeout=10) for _ in range(20)]
        try:
            for i, s in enumerate(clients):
                s.sendall(b"request %d\n" % i)
            srv.wait_line("gated start", count=20)
            srv.signal(signal.SIGTERM)
            srv.wait_line("SIGTERM received")
            # Stop accepting at once: new clients are refused while the 20 are still running.
            wait_for(lambda: _refused(addr), what="the listener to close after SIGTERM")
            gate.touch()
            for i, s in enumerate(clients):
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = s.recv(1024)
                    assert chunk, f"client {i} was closed without its reply; log:\n{srv.log}"
                    reply += chunk
                assert reply == b"done request %d\n" % i
                assert closed_by_peer(s), f"client {i} was not closed after its reply"
        finally:
            for s in clients:
                s.close()
        rc, log = srv.wait(20)
    assert rc == 0, log
    # 20, or 21 when a refusal probe got in before the signal was handled.
    assert re.search(r"stopping: 2[01] connection\(s\) open", log), log
    assert "drain timeout" not in log


def test_sigterm_answers_udp_requests_in_flight(tmp_path: Path) -> None:
    gate = tmp_path / "release"
    with LoggedServer(
        "fault_services:gated", "--listen", "udp://127.0.0.1:0", env={"FAULT_GATE": str(gate)}
    ) as srv:
        addr = srv.addr("udp")
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
        try:
            for i, s in enumerate(socks):
                s.settimeout(10)
                s.sendto(b"dgram %d" % i, addr)
            srv.wait_line("gated start", count=5)
            srv.signal(signal.SIGTERM)
            srv.wait_line("SIGTERM received")
            gate.touch()
            for i, s in enumerate(socks):
                assert s.recvfrom(1024)[0] == b"done dgram %d" % i, srv.log
        finally:
            for s in socks:
                s.close()
        rc, log = srv.wait(20)
    assert rc == 0, log


def test_idle_connections_do_not_hold_up_shutdown() -> None:
    with LoggedServer("--listen", "tcp://127.0.0.1:0", "--drain-timeout", "60") as srv:
        clients = [socket.create_connection(srv.addr("tcp"), timeout=10) for _ in range(10)]
        try:
            srv.wait_line("open from", count=10)
            srv.signal(signal.SIGTERM)
            for s in clients:
                assert closed_by_peer(s, timeout=10), "an idle client was not closed on SIGTERM"
        finally:
            for s in clients:
                s.close()
        rc, log = srv.wait(20)  # far less than the 60 s drain timeout
    assert rc == 0, log
    assert "drain timeout" not in log


def test_drain_timeout_closes_what_is_still_running(tmp_path: Path) -> None:
    env = {"FAULT_GATE": str(tmp_path / "never")}
    with LoggedServer(
        "fault_services:gated", "--listen", "tcp://127.0.0.1:0", "--drain-timeout", "0.5", env=env
    ) as srv:
        with socket.create_connection(srv.addr("tcp"), timeout=10) as s:
            s.sendall(b"stuck")
            srv.wait_line("gated start")
            srv.signal(signal.SIGTERM)
            assert closed_by_peer(s, timeout=10), "the stuck request was never closed"
        rc, log = srv.wait(20)
    assert rc == 0, log
    assert "drain timeout: closing 1 connection(s) still open" in log


@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_second_sigint_forces_exit(tmp_path: Path, scheme: str) -> None:
    env = {"FAULT_GATE": str(tmp_path / "never")}
    with LoggedServer(
        "fault_services:gated",
        "--listen",
        f"{scheme}://127.0.0.1:0",
        "--drain-timeout",
        "120",
        env=env,
    ) as srv:
        kind = socket.SOCK_STREAM if scheme == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as s:
            s.settimeout(10)
            s.connect(srv.addr(scheme))
            s.send(b"stuck")
            srv.wait_line("gated start")
            srv.signal(signal.SIGINT)
            srv.wait_line("SIGINT received: shutting down")
            srv.signal(signal.SIGINT)
            rc, log = srv.wait(20)  # far less than the 120 s drain timeout
    assert "second SIGINT: forcing exit" in log
    assert rc == 1, log


@pytest.mark.parametrize("engine", ["auto", "asyncio"], ids=["epoll", "asyncio"])
def test_server_thread_stop_drains_in_flight_requests(serve: Serve, engine: str) -> None:
    """The Python API drains the same way: stop() lets running requests answer."""
    started = threading.Semaphore(0)
    release = threading.Event()

    async def held(request: bytes, ctx: sockserve.Context) -> bytes:
        started.release()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return b"done " + request

    st = serve(held, "tcp://127.0.0.1:0", framing="line", drain_timeout=30, engine=engine)
    addr = addr_of(st.url("tcp"))
    clients = [socket.create_connection(addr, timeout=10) for _ in range(5)]
    try:
        for i, s in enumerate(clients):
            s.sendall(b"r%d\n" % i)
        for _ in clients:
            assert started.acquire(timeout=10), "a request never started"
        stopper = threading.Thread(target=st.stop)
        stopper.start()
        wait_for(lambda: _refused(addr), what="the listener to close on stop()")
        release.set()
        for i, s in enumerate(clients):
            assert s.recv(1024) == b"done r%d\n" % i
        stopper.join(20)
        assert not stopper.is_alive(), "stop() did not return"
    finally:
        release.set()
        for s in clients:
            s.close()


API_SCRIPT = """
import logging, sys
import sockserve
from fault_services import gated, upper

async def handler(request, ctx):
    # "hold..." waits for $FAULT_GATE (a request in flight at SIGTERM); the rest: upper.
    return upper(await gated(request, ctx) if request.startswith(b"hold") else request, ctx)

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
sys.exit(sockserve.serve(
    handler, "tcp://127.0.0.1:0", "udp://127.0.0.1:0",
    framing="line", max_message=16, idle_timeout=30, max_conns=10, drain_timeout=5,
    deny=["127.0.0.2"], udp_rate=1000,
))
"""


def test_python_api_serve_takes_the_same_settings_and_drains_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM with requests in flight (one running, one pipelined behind it): both are
    answered before the server exits 0."""
    gate = tmp_path / "release"
    env = {"FAULT_GATE": str(gate)}
    with LoggedServer(prefix=[sys.executable, "-c", API_SCRIPT], ready=2, env=env) as srv:
        url = srv.url("tcp")
        with sockserve.connect(url, framing="line", timeout=5) as c:
            assert c.request(b"api") == b"API"
        with socket.create_connection(addr_of(url), timeout=5) as s:
            s.sendall(b"y" * 40 + b"\n")  # past max_message=16
            assert closed_by_peer(s)
        srv.wait_line("protocol error: line of 40 bytes exceeds the 16-byte cap")
        with socket.create_connection(addr_of(url), timeout=5, source_address=("127.0.0.2", 0)):
            srv.wait_line("denied 127.0.0.2:")
        with socket.create_connection(addr_of(url), timeout=10) as held:
            held.sendall(b"hold1\nnext\n")
            srv.wait_line("gated start hold1")
            srv.signal(signal.SIGTERM)
            srv.wait_line("stopping: 1 connection(s) open, draining")
            gate.touch()
            got = b""
            while got.count(b"\n") < 2:
                chunk = held.recv(1024)
                assert chunk, f"closed after {got!r}: in-flight requests dropped"
                got += chunk
            assert got == b"DONE HOLD1\nNEXT\n"
        rc, log = srv.wait(20)
    assert rc == 0, log
