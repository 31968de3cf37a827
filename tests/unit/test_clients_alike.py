"""The blocking and the asyncio client fail alike: each behaviour on both, on loopback peers.

The peers are bare sockets, so each failure is exactly the one named: a TCP listener whose
accept queue is full (Linux drops the SYN, so connect() waits: a connect timeout), a
listener that never accepts (the kernel completes the TCP handshake, then nothing: a TLS
handshake or a reply that never comes), a closed port, a missing socket file, and
servers that answer one request too late.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

import sockserve

pytestmark = pytest.mark.timeout(60)

KINDS = ["blocking", "asyncio"]


def one_request(kind: str, url: str, data: bytes = b"hi", **options: Any) -> bytes:
    """Connect, send one request, return the reply (or raise what the client raised)."""
    if kind == "blocking":
        with sockserve.connect(url, **options) as c:
            return c.request(data)

    async def go() -> bytes:
        async with sockserve.aconnect(url, **options) as c:
            return await c.request(data)

    return asyncio.run(asyncio.wait_for(go(), 20))


def two_requests(
    kind: str, url: str, first: bytes, between: Callable[[], None], **options: Any
) -> tuple[BaseException, bytes]:
    """Request ``first`` (which must fail), run ``between``, then request b"fast" on the
    same client object: (the first error, the second reply)."""
    if kind == "blocking":
        with sockserve.connect(url, **options) as c:
            with pytest.raises(sockserve.ClientError) as info:
                c.request(first)
            between()
            return info.value, c.request(b"fast")

    async def go() -> tuple[BaseException, bytes]:
        async with sockserve.aconnect(url, **options) as c:
            with pytest.raises(sockserve.ClientError) as info:
                await c.request(first)
            await asyncio.get_running_loop().run_in_executor(None, between)
            receiver = c._receiver
            if receiver is not None:  # readiness: the late datagram reached the client's queue
                for _ in range(2000):
                    if not receiver.queue.empty():
                        break
                    await asyncio.sleep(0.001)
            return info.value, await c.request(b"fast")

    return asyncio.run(asyncio.wait_for(go(), 20))


@contextmanager
def full_backlog() -> Iterator[str]:
    """A TCP listener with a full accept queue: a new SYN goes unanswered, connect() waits."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)  # room for one connection, which the filler takes
    filler = socket.create_connection(lst.getsockname(), timeout=5)
    try:
        yield f"tcp://127.0.0.1:{lst.getsockname()[1]}"
    finally:
        filler.close()
        lst.close()


@contextmanager
def silent_listener() -> Iterator[int]:
    """A listener that never accepts: connections complete in the kernel, nothing is read."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    try:
        yield int(lst.getsockname()[1])
    finally:
        lst.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- connecting ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_connect_timeout_is_a_connect_error(kind: str) -> None:
    """Mutation: the old mapping (connect timeout -> RequestTimeout) fails every assert."""
    with full_backlog() as url:
        t0 = time.monotonic()
        with pytest.raises(sockserve.ConnectError) as info:
            one_request(kind, url, timeout=0.3)
        took = time.monotonic() - t0
    exc = info.value
    assert isinstance(exc, ConnectionError) and not isinstance(exc, sockserve.RequestTimeout)
    assert str(exc).startswith(f"{url}: connect not done within 0.3s"), exc
    assert exc.endpoint == url and exc.errno == errno.ETIMEDOUT
    assert took < 10, took  # the client's 0.3 s, not the kernel's two minutes of SYN retries


@pytest.mark.parametrize("kind", KINDS)
def test_tls_handshake_timeout_is_a_connect_error(kind: str) -> None:
    with silent_listener() as port:
        url = f"tls://127.0.0.1:{port}"
        with pytest.raises(sockserve.ConnectError) as info:
            one_request(kind, url, timeout=0.3, tls_verify=False)
    assert str(info.value).startswith(f"{url}: connect and TLS handshake not done within 0.3s")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_refused_is_a_connect_error_with_its_errno(kind: str, scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{closed_port()}"
    with pytest.raises(ConnectionError) as info:
        one_request(kind, url, timeout=3)
    exc = info.value
    assert isinstance(exc, sockserve.ConnectError)
    assert exc.errno == errno.ECONNREFUSED
    assert str(exc) == f"{url}: connection refused (is the server running?)"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme", ["unix", "unixgram"])
def test_missing_socket_file_is_a_connect_error(kind: str, scheme: str, tmp_path: Path) -> None:
    url = f"{scheme}://{tmp_path}/absent.sock"
    with pytest.raises(sockserve.ConnectError) as info:
        one_request(kind, url, timeout=3)
    assert str(info.value) == f"{url}: no such socket file"
    assert info.value.errno == errno.ENOENT


# -- waiting for the reply -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("framing", ["line", "raw"])
def test_no_reply_is_a_request_timeout(kind: str, framing: str) -> None:
    with silent_listener() as port:
        url = f"tcp://127.0.0.1:{port}"
        with pytest.raises(TimeoutError) as info:
            one_request(kind, url, framing=framing, timeout=0.3)
    exc = info.value
    assert isinstance(exc, sockserve.RequestTimeout) and not isinstance(exc, ConnectionError)
    assert str(exc).startswith(f"{url}: no reply within 0.3s"), exc
    # Raw framing waits for the close: the message says how else a reply can end.
    assert ("--framing line/length or --reply-size" in str(exc)) == (framing == "raw")


class LateServer:
    """Echoes each request, but holds the reply to b"slow" until ``release`` and then sends
    b"late" (``sent`` is set once it has): a reply that comes after the client gave up."""

    def __init__(self, scheme: str) -> None:
        self.release = threading.Event()
        self.sent = threading.Event()
        stream = scheme == "tcp"
        self.sock = socket.socket(type=socket.SOCK_STREAM if stream else socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}"
        if stream:
            self.sock.listen(8)
        self.thread = threading.Thread(target=self._tcp if stream else self._udp, daemon=True)
        self.thread.start()

    def _answer(self, request: bytes) -> bytes:
        if request == b"slow":
            self.release.wait(10)
            return b"late"
        return request

    def _udp(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(100)
            except OSError:
                return
            self.sock.sendto(self._answer(data), peer)
            if data == b"slow":
                self.sent.set()

    def _tcp(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                request = line.rstrip(b"\n")
                # OSError: the client closed that connection, the late reply goes nowhere.
                with suppress(OSError):
                    conn.sendall(self._answer(request) + b"\n")
                if request == b"slow":
                    self.sent.set()

    def after_the_timeout(self) -> None:
        """Let the late reply go and wait until it has."""
        self.release.set()
        assert self.sent.wait(10), "the server never sent the late reply"

    def close(self) -> None:
        self.release.set()
        self.sock.close()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme", ["tcp", "udp"])
def test_a_late_reply_is_never_taken_for_the_next_request(kind: str, scheme: str) -> None:
    """Mutation: keeping the connection after a stream timeout (or not dropping waiting
    datagrams before a datagram request) hands b"late" to the request for b"fast"."""
    server = LateServer(scheme)
    try:
        options: dict[str, Any] = {"timeout": 0.4}
        if scheme == "tcp":
            options["framing"] = "line"
        first, second = two_requests(kind, server.url, b"slow", server.after_the_timeout, **options)
    finally:
        server.close()
    assert isinstance(first, sockserve.RequestTimeout), first
    assert second == b"fast"
