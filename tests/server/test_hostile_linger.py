"""Hostile-client pass, lingering close: a stream session that closes first (time, daytime,
qotd) must not let an RST destroy the reply it already sent.

Before the fix ``sockserve call --hex tcp://.../time x`` failed with exit 5 "connection
reset" about one call in four: the server closed with the client's request unread, its
kernel answered with RST, and the client's kernel dropped the 4 unread reply bytes.
Real sockets on loopback, every wait bounded.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faultkit import LoggedServer, addr_of
from support import SOCKSERVE, wait_for

from sockserve.server import ServerThread
from sockserve.service import Service, StreamSession
from sockserve.services.time import EPOCH_1900

ENGINES = ["auto", "asyncio"]
BUILDS = [{}, {"SOCKSERVE_PURE_PYTHON": "1"}]


def _ask_and_half_close(sock: socket.socket) -> bytes:
    """What ``call`` does with raw framing: send, half-close, read to the end."""
    sock.sendall(b"x")
    sock.shutdown(socket.SHUT_WR)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _check_time(reply: bytes) -> None:
    assert len(reply) == 4, reply
    seconds = struct.unpack("!I", reply)[0]
    assert abs(seconds - (int(time.time()) + EPOCH_1900) % 2**32) < 60


@pytest.mark.parametrize("engine", ENGINES)
def test_time_reply_survives_a_request_sent_before_the_close(
    serve: Callable[..., ServerThread], sock_dir: Path, engine: str
) -> None:
    """30 clients in a row, TCP and Unix, each sends a request and half-closes: all get 4 bytes."""
    path = sock_dir / "time.sock"
    st = serve("time", "tcp://127.0.0.1:0", f"unix://{path}", engine=engine)
    resets = 0
    for _ in range(30):
        for family, addr in (
            (socket.AF_INET, addr_of(st.url("tcp"))),
            (socket.AF_UNIX, str(path)),
        ):
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(addr)
                try:
                    _check_time(_ask_and_half_close(s))
                except ConnectionResetError:
                    resets += 1
    assert resets == 0, f"{resets} of 60 replies destroyed by a reset"


@pytest.mark.parametrize("env", BUILDS, ids=["c-helper", "pure-python"])
def test_call_hex_against_time_30_in_a_row(env: dict[str, str]) -> None:
    """The issue's own command, 30 times: every call exits 0 with the 4 bytes dumped."""
    with LoggedServer("time", "--listen", "tcp://127.0.0.1:0", env=env) as srv:
        url = srv.url("tcp")
        failed = []
        for _ in range(30):
            r = subprocess.run(
                [*SOCKSERVE, "call", "--hex", url, "x"],
                capture_output=True,
                timeout=20,
                check=False,
                env={**os.environ, **env},
            )
            if r.returncode != 0 or not r.stdout.startswith(b"00000000: "):
                failed.append((r.returncode, r.stderr.decode(errors="replace").strip()))
        assert not failed, f"{len(failed)} of 30 calls failed: {failed[:3]}"


@pytest.mark.parametrize("idle", [None, 0.5])
def test_lingering_close_is_bounded(serve: Callable[..., ServerThread], idle: float | None) -> None:
    """A client that sends forever after its reply is closed after the bound (2 s, or the
    idle timeout when shorter), not kept open; the server serves others meanwhile."""
    options = {} if idle is None else {"idle_timeout": idle}
    st = serve("time", "tcp://127.0.0.1:0", **options)
    bound = 2.0 if idle is None else idle
    with socket.create_connection(addr_of(st.url("tcp")), timeout=5) as s:
        got = b""
        while len(got) < 4:
            chunk = s.recv(4 - len(got))
            assert chunk, "closed before the reply"
            got += chunk
        _check_time(got)
        start = time.monotonic()
        closed = False
        s.settimeout(0.05)
        while time.monotonic() - start < bound + 5:
            try:
                s.sendall(b"y" * 1024)
                if s.recv(65536) == b"":
                    continue  # the FIN of the lingering close: the server still drains us
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed, "the lingering close never ended while the client kept sending"
        # the bound held (and it did linger: not closed the moment the reply went out)
        assert time.monotonic() - start < bound + 5
        # a second client is served meanwhile and afterwards
        with socket.create_connection(addr_of(st.url("tcp")), timeout=5) as s2:
            _check_time(_ask_and_half_close(s2))
    wait_for(lambda: not st.server.streams[0].conns, 5, "the lingering connection to go")


class _WritesAfterClose(StreamSession):
    """A careless session: a reply, close(), then one more write (dropped, as before)."""

    def on_connect(self) -> None:
        self.conn.write(b"bye\r\n")
        self.conn.close()
        self.conn.write(b"too late")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_write_after_close_is_dropped_not_an_error(
    serve: Callable[..., ServerThread], server_logs: Any, engine: str
) -> None:
    """After the lingering close's half-close a write would raise; it is dropped, the reply
    arrives whole and nothing is logged as a service error."""
    service = Service(name="careless", stream=_WritesAfterClose)
    st = serve(service, "tcp://127.0.0.1:0", engine=engine)
    for _ in range(5):
        with socket.create_connection(addr_of(st.url("tcp")), timeout=5) as s:
            assert _ask_and_half_close(s) == b"bye\r\n"
    assert not server_logs.errors(), server_logs.errors()
