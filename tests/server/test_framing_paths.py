"""Line and length framing answer byte for byte alike on every path a request can take:
the C fast path, its Python twin, FastStream's slow path (the codec) and asyncio
transports (``engine="asyncio"``), each against what the codec itself says.

Every stream is sent whole (several messages per chunk) and split at every byte; after
the first part the client waits for the replies its whole messages earn, so the server
has read it before the rest comes (the rest then continues a partial message, or
starts a new one). The handler notes who called it, so each path is seen to be the one
that answered.
"""

from __future__ import annotations

import select
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from strict import require
from support import addr_of

from sockserve._engine import epoll
from sockserve._engine.faststream import FastStream
from sockserve.errors import ProtocolError
from sockserve.framing import make_codec
from sockserve.server import ServerThread

try:
    from sockserve import _speedups
except ImportError:  # not built: CI (CI=true) fails the C path instead of skipping it
    _speedups = None  # type: ignore[assignment]

pytestmark = pytest.mark.timeout(120)

CAP = 8
PATHS = ["c", "twin", "slow", "asyncio"]
#: Who calls the handler on each path (its caller's function name), besides the codec's
#: ``dispatch`` (a chunk's unfinished rest): the path must show up there.
CALLERS = {"c": "_poll_c", "twin": "serve_framed", "slow": "dispatch", "asyncio": "dispatch"}


def reply_to(request: bytes) -> Any:
    """Replies of every kind a codec frames: none, bytes, another bytes-like, a big one."""
    if request == b"none":
        return None
    if request == b"ba":
        return bytearray(b"BA")
    if request == b"mv":
        return memoryview(b"MV")
    if request.startswith(b"big"):
        return request * 10_000
    return b"<" + request + b">"


def expected(framing: str, data: bytes, eof: bool) -> bytes:
    """What the codec says ``data`` earns: each whole message's framed reply, until a
    protocol error (which closes the connection); at end of input, the last message."""
    codec = make_codec(framing, CAP)
    out = b""
    try:
        codec.feed(data)
        while (msg := codec.next_message()) is not None:
            reply = reply_to(msg)
            if reply is not None:
                out += codec.encode(reply)
        last = codec.end_of_input() if eof else None
        if last is not None and (reply := reply_to(last)) is not None:
            out += codec.encode(reply)
    except ProtocolError:
        pass
    return out


class PathServer:
    """A server on one path, its handler noting its callers."""

    def __init__(self, path: str, framing: str, monkeypatch: pytest.MonkeyPatch) -> None:
        if path == "c":
            assert _speedups is not None
            monkeypatch.setattr(epoll, "c_poll_fast", _speedups.poll_fast)
        else:
            monkeypatch.setattr(epoll, "c_poll_fast", None)  # the hub polls with the twin
        if path == "slow":
            monkeypatch.setattr(FastStream, "fast_spec", lambda self: None)
        self.callers: set[str] = set()

        def handler(request: bytes, ctx: Any) -> Any:
            self.callers.add(sys._getframe(1).f_code.co_name)
            if request == b"boom":
                raise RuntimeError("boom")
            return reply_to(request)

        engine = "asyncio" if path == "asyncio" else "auto"
        self.thread = ServerThread(
            handler, "tcp://127.0.0.1:0", framing=framing, max_message=CAP, engine=engine
        )
        self.thread.start()
        self.addr = addr_of(self.thread.url("tcp"))

    def exchange(self, parts: list[bytes], framing: str) -> bytes:
        """Send ``parts`` one after the other, each once the replies to what was sent
        before it have come; then end the stream and read everything to the close."""
        with socket.create_connection(self.addr, timeout=10) as sock:
            got = b""
            sent = b""
            try:
                for part in parts:
                    if sent:
                        want = len(expected(framing, sent, eof=False))
                        got += read_until(sock, want - len(got))
                    sock.sendall(part)
                    sent += part
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # EPIPE, ECONNRESET, ENOTCONN: closed after a protocol error
                pass  # what it sent before is still read
            return got + read_until(sock, None)


def read_until(sock: socket.socket, want: int | None) -> bytes:
    """``want`` more bytes (fewer if the server closes), or everything to the close."""
    got = b""
    while want is None or len(got) < want:
        if not select.select([sock], [], [], 10)[0]:
            raise AssertionError(f"no reply within 10 s; have {got!r}")
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return got


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    if request.param == "c":
        require(_speedups is not None, "sockserve._speedups is not built")
    return str(request.param)


@pytest.fixture
def server(path: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], PathServer]]:
    started: list[PathServer] = []

    def start(framing: str) -> PathServer:
        started.append(PathServer(path, framing, monkeypatch))
        return started[-1]

    yield start
    for s in started:
        s.thread.stop()


def frames(*bodies: bytes) -> bytes:
    return b"".join(len(b).to_bytes(4, "big") + b for b in bodies)


STREAMS = {
    "line": [
        b"one\ntwo\r\n\n\r\nlast",  # empty lines, \r\n, an unterminated last line
        b"none\nba\nmv\nx\n",  # no reply, bytes-likes, between plain ones
        b"12345678\n1234567\r\r\n123456789\nafter\n",  # at the cap, and one byte over
        b"ok\n" + b"x" * (CAP + 3),  # a tail over the cap without its newline
        b"ok\r",  # the last line's \r is stripped too
        b"big\nsmall\n" * 3,  # big replies between small ones
    ],
    "length": [
        frames(b"", b"a", b"", b"bcd"),  # zero-length frames among others
        frames(b"none", b"ba", b"mv", b"12345678") + frames(b"123456789", b"after"),
        frames(b"ok") + b"\0\0",  # a partial prefix at the end
        frames(b"ok") + b"\0\0\0\x05abc",  # a partial body at the end
        frames(b"big", b"small") * 3,
    ],
}


@pytest.mark.parametrize("framing", ["line", "length"])
def test_every_path_answers_every_split_alike(
    path: str, framing: str, server: Callable[[str], PathServer]
) -> None:
    srv = server(framing)
    for stream in STREAMS[framing]:
        want = expected(framing, stream, eof=True)
        assert srv.exchange([stream], framing) == want, (path, stream)
        for cut in range(1, len(stream)):
            got = srv.exchange([stream[:cut], stream[cut:]], framing)
            assert got == want, (path, stream, cut)
    assert CALLERS[path] in srv.callers, (path, srv.callers)
    if path in ("slow", "asyncio"):
        assert srv.callers == {"dispatch"}


@pytest.mark.parametrize("framing", ["line", "length"])
def test_pipelined_requests_answered_alike(
    path: str, framing: str, server: Callable[[str], PathServer]
) -> None:
    """Thousands of requests in flight: chunks full of whole messages, and messages cut
    wherever the kernel cut them."""
    srv = server(framing)
    bodies = [b"m%d" % i for i in range(3000)]
    stream = b"".join(b + b"\n" for b in bodies) if framing == "line" else frames(*bodies)
    assert srv.exchange([stream], framing) == expected(framing, stream, eof=True)


@pytest.mark.parametrize("framing", ["line", "length"])
def test_a_handler_that_raises_mid_chunk_ends_alike(
    path: str, framing: str, server: Callable[[str], PathServer]
) -> None:
    """The replies before it go out, nothing after it is answered, the connection closes."""
    srv = server(framing)
    bodies = [b"a", b"b", b"boom", b"c"]
    stream = b"".join(b + b"\n" for b in bodies) if framing == "line" else frames(*bodies)
    before = expected(framing, stream.partition(b"boom")[0], eof=False)
    assert srv.exchange([stream], framing) == before
