"""Issue 12: every framing and handler kind gives byte-identical replies on every path.

One matrix: framing {raw, line, length} x handler kind {sync inline, ``@blocking`` (the
handler threads), ``async def`` (suspending on some requests), one returning None (no
reply), one raising, one returning bytes-likes that are not ``bytes`` and on some requests
a ``str``} x path {the epoll hub's C fast path, its pure-Python twin, asyncio transports
(``engine="asyncio"``), TLS} x endpoint {tcp, unix} (TLS is tcp only). Each cell feeds the
SAME request streams: one message per send (lock-step), several per send, the whole
stream in 1-byte sends (TCP_NODELAY; 1-byte records under TLS) read as it goes, a
pipelined burst, the largest message (max-message) and one over it, and (its own test)
a burst or a partial message followed at once by a half-close: every request already
received must be answered before the close. The replies must equal, byte for byte, what
the handler itself and the codec's ``encode`` say (:func:`reference`), and what every
other path answered to the same stream (``ANSWERS``).

Raw framing has no message boundaries (each chunk read is one request), so its handlers
map bytes one by one (a reply to any cut of the stream is the same bytes), and a request
that makes a handler raise or return a ``str`` is sent alone once the replies to
everything before it have come (``Send.sync``): the chunk the server reads is then the
one the reference cuts.

Servers are shared: one per path, one binding per (framing, kind, endpoint), started on
first use. The handlers note who called them, so each path is seen to be the one that
answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import select
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strict import require
from support import addr_of

import sockserve
from sockserve._engine import epoll
from sockserve.errors import ProtocolError
from sockserve.framing import DEFAULT_MAX_MESSAGE, make_codec
from sockserve.server import Server, ServerThread, make_binding

try:
    from sockserve import _speedups
except ImportError:  # not built: CI (CI=true) fails the C path instead of skipping it
    _speedups = None  # type: ignore[assignment]

pytestmark = pytest.mark.timeout(60)

CAP = DEFAULT_MAX_MESSAGE
TIMEOUT = 10.0
FRAMINGS = ["raw", "line", "length"]
KINDS = ["inline", "blocking", "async", "none", "raises", "nonbytes"]
PATHS = ["c", "twin", "asyncio", "tls"]
ENDPOINTS = ["tcp", "unix"]
#: The sync kinds the fast path may call, and who calls them on each path (frame names:
#: the handler's caller, and its caller).
SYNC_KINDS = {"inline", "none", "raises", "nonbytes"}


def fast_caller(path: str, framing: str) -> tuple[str, ...]:
    if path == "c":
        return ("_poll_c",)  # the C helper calls the handler from the hub's poll
    if path == "twin":
        return ("answer", "serve") if framing == "raw" else ("serve_framed", "serve")
    return ("answer", "data_received") if framing == "raw" else ("dispatch", "drain_codec")


# -- what each handler kind answers (the one source: servers and reference alike) -------

#: Each byte maps to the next one, and ``#`` to 30,000 of them (big replies: partial
#: writes, backpressure); a byte-by-byte map, so a raw reply is the same however the
#: stream was cut into reads.
BIG = 30_000
_TABLE = bytes((b + 1) % 256 for b in range(256))


def transform(request: bytes) -> bytes:
    if b"#" not in request:
        return request.translate(_TABLE)
    return b"".join(b"#" * BIG if c == b"#" else c.translate(_TABLE) for c in _bytes(request))


def _bytes(data: bytes) -> Iterator[bytes]:
    return (data[i : i + 1] for i in range(len(data)))


class Refused(Exception):
    """What the raising handler raises (on a request holding ``!``)."""


def behave(kind: str, request: bytes) -> Any:
    """The reply of handler ``kind`` to ``request`` (or its exception)."""
    if kind == "none":  # "-" bytes answer nothing; a request of nothing else, None
        return transform(request.replace(b"-", b"")) or None
    if kind == "raises" and b"!" in request:
        raise Refused(f"asked to, by {request[:20]!r}")
    if kind == "nonbytes":
        if b"?" in request:
            return request.decode("latin-1")  # a str: not a reply; the connection closes
        reply = transform(request)  # bytes among the others: the fast path gathers those
        if len(request) % 3 == 0:
            return reply
        return memoryview(reply) if len(request) % 2 else bytearray(reply)
    return transform(request)


#: Bytes that change what a kind does, per kind: in raw framing a request holding one is
#: sent alone, after the replies before it (see the module docstring).
TRIGGERS = {"raises": b"!", "nonbytes": b"?"}


def reference(framing: str, kind: str, sends: list[Send], eof: bool) -> bytes:
    """What the handler and the codec say ``sends`` earn: each whole message's framed
    reply, up to the first that raises or is no reply (the connection closes), or a
    protocol error; at end of input, the codec's last message. Raw framing: each send is
    one chunk read."""
    codec = make_codec(framing, CAP)
    out = bytearray()

    def answered(msg: bytes) -> bool:
        try:
            reply = behave(kind, msg)
        except Refused:
            return False
        if reply is None:
            return True
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            return False
        out.extend(codec.encode(bytes(reply)))
        return True

    chunks = [s.data for s in sends] if framing == "raw" else [b"".join(s.data for s in sends)]
    try:
        for chunk in chunks:
            codec.feed(chunk)
            while (msg := codec.next_message()) is not None:
                if not answered(msg):
                    return bytes(out)
        if eof and (last := codec.end_of_input()) is not None:
            answered(last)
    except ProtocolError:
        pass
    return bytes(out)


# -- the request streams -----------------------------------------------------------------


class Send(NamedTuple):
    data: bytes
    #: Sent only once the replies to everything before it have come.
    sync: bool = False


def encode_all(framing: str, messages: list[bytes]) -> list[bytes]:
    """Each message as it goes on the wire (line: ``\\n`` after it; raw: as it is)."""
    if framing == "line":
        return [m + b"\n" for m in messages]
    if framing == "length":
        return [len(m).to_bytes(4, "big") + m for m in messages]
    return list(messages)


#: Plain requests, those a kind treats specially ("-" none, "#" big), CRLF and empty lines.
BASE = [b"alpha", b"-", b"b-c", b"", b"Zz\r", b"#", b"x" * 40, b"--", b"end"]
#: Ends with requests that make "nonbytes" (``?``) and then "raises" (``!``) close.
TRIGGERED = [*BASE, b"what?", b"ok", b"no!", b"after"]


def _raw(messages: list[bytes]) -> list[bytes]:
    return [m for m in messages if m]  # raw framing has no empty request


def _aligned(sends: list[Send]) -> list[Send]:
    """Raw framing: a send holding a trigger is sent once the replies before it came."""
    return [Send(s.data, s.sync or any(t in s.data for t in TRIGGERS.values())) for s in sends]


def streams(framing: str) -> dict[str, list[Send]]:
    """The request streams every path is fed (each then waits for its replies and ends
    with a half-close, read to the server's close)."""
    msgs = _raw(TRIGGERED) if framing == "raw" else TRIGGERED
    wire = encode_all(framing, msgs)
    whole = b"".join(wire)
    grouped = [b"".join(wire[i : i + 3]) for i in range(0, len(wire), 3)]
    big = {
        "raw": [b"m" * CAP, b"n" * (CAP + 1), b"after"],  # over the cap: split, not refused
        "line": [b"m" * CAP + b"\n", b"m" * CAP + b"\r\n", b"n" * (CAP + 1) + b"\n", b"after\n"],
        "length": encode_all("length", [b"m" * CAP, b"n" * (CAP + 1), b"after"]),
    }[framing]
    out = {
        "one-per-send": [Send(w, sync=True) for w in wire],
        "several-per-send": [Send(g) for g in grouped],
        "byte-split": [Send(whole[i : i + 1]) for i in range(len(whole))],
        "pipelined": [Send(b"".join(encode_all(framing, _raw(BASE) * 40)))],
        "max-message": [Send(b, sync=True) for b in big],
    }
    if framing == "raw":
        out = {name: _aligned(sends) for name, sends in out.items()}
    return out


def half_close_streams(framing: str) -> dict[str, list[Send]]:
    """Streams the client ends with a half-close right after its last send: what was
    received must all be answered (also by the handler threads and tasks) before the
    close. Line: the unterminated last line is a request too; length: a cut frame is a
    protocol error once the whole frames before it are answered."""
    msgs = _raw(BASE) if framing == "raw" else BASE
    burst = b"".join(encode_all(framing, [*msgs * 20, SLOW_REQUEST]))
    partial = {"raw": b"tail", "line": b"t~il\r", "length": b"\0\0\0\x09tail"}[framing]
    return {
        "burst-then-eof": [Send(burst)],
        "partial-then-eof": [Send(burst), Send(partial, sync=framing == "length")],
    }


# -- servers -----------------------------------------------------------------------------


@dataclass
class Cell:
    """One binding: its address, and who called its handler."""

    family: int
    addr: Any
    callers: set[tuple[str, ...]] = field(default_factory=set)
    #: The modules of the handler's five nearest callers (TLS on the hub: server/tlsconn.py).
    modules: set[str] = field(default_factory=set)
    threads: set[str] = field(default_factory=set)


#: The request a half-close stream ends with: the thread or task answering it is surely
#: still running when the client's FIN comes (it holds its reply this long).
SLOW_REQUEST = b"~"
SLOW = 0.1


def make_handler(kind: str, cell: Cell) -> Any:
    if kind == "async":

        async def handler_async(request: bytes, ctx: sockserve.Context) -> Any:
            if b"~" in request:
                await asyncio.sleep(SLOW)
            elif len(request) % 3 == 0 or b"#" in request:
                await asyncio.sleep(0)  # a task left pending: answered on a later turn
            return behave(kind, request)

        return handler_async

    def handler(request: bytes, ctx: sockserve.Context) -> Any:
        frames = sys._getframe(1), sys._getframe(2)
        cell.callers.add(tuple(f.f_code.co_name for f in frames))
        cell.modules.update(Path(sys._getframe(i).f_code.co_filename).name for i in range(1, 6))
        cell.threads.add(threading.current_thread().name)
        if kind == "blocking" and b"~" in request:
            time.sleep(SLOW)  # in a handler thread: the loop goes on
        return behave(kind, request)

    return sockserve.blocking(handler) if kind == "blocking" else handler


class Servers:
    """One server per path, started on first use, each with a binding per cell."""

    def __init__(self, certs: Any, sock_dir: Path) -> None:
        self._certs = certs
        self._dir = sock_dir
        self.running: dict[str, ServerThread] = {}
        self.cells: dict[tuple[str, str, str, str], Cell] = {}

    def cell(self, path: str, framing: str, kind: str, endpoint: str) -> Cell:
        if path not in self.running:
            self._start(path)
        return self.cells[path, framing, kind, endpoint]

    def _start(self, path: str) -> None:
        settings: dict[str, Any] = {"engine": "asyncio" if path == "asyncio" else "auto"}
        if path == "tls":
            settings |= {"tls_cert": self._certs.server_cert, "tls_key": self._certs.server_key}
        bindings, cells = [], []
        for framing in FRAMINGS:
            for kind in KINDS:
                for endpoint in ["tcp"] if path == "tls" else ENDPOINTS:
                    name = f"{path}-{framing}-{kind}-{endpoint}"
                    url = (
                        f"unix://{self._dir / name}.sock"
                        if endpoint == "unix"
                        else f"{'tls' if path == 'tls' else 'tcp'}://127.0.0.1:0"
                    )
                    fam = socket.AF_UNIX if endpoint == "unix" else socket.AF_INET
                    cell = Cell(fam, None)
                    handler = make_handler(kind, cell)
                    config = sockserve.ServerConfig(framing=framing, max_message=CAP, **settings)
                    bindings.append(make_binding(handler, [url], config))
                    cells.append(((path, framing, kind, endpoint), cell))
        thread = ServerThread(Server(*bindings))
        thread.start()
        self.running[path] = thread
        hub = thread.server.hub
        if path in ("c", "twin"):
            # Before the first connection (the hub serves none yet): this hub polls with
            # the C helper, or with its pure-Python twin, whatever the build.
            assert hub is not None
            hub._poll = hub._poll_c if path == "c" else hub._poll_python
        for (key, cell), ep in zip(cells, thread.endpoints, strict=True):
            cell.addr = ep.path if ep.is_unix else (ep.host, ep.port)
            self.cells[key] = cell

    def stop(self) -> None:
        for thread in self.running.values():
            thread.stop()


@pytest.fixture(scope="module")
def servers(certs: Any) -> Iterator[Servers]:
    with pytest.MonkeyPatch.context() as mp:
        if _speedups is not None:  # the C path also under SOCKSERVE_PURE_PYTHON=1
            mp.setattr(epoll, "c_poll_fast", _speedups.poll_fast)
        d = Path(tempfile.mkdtemp(prefix="ss-id-", dir="/tmp"))  # sun_path is short
        s = Servers(certs, d)
        yield s
        s.stop()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


# -- the client: plain or TLS, non-blocking, reading as it sends -------------------------


class Wire:
    """A client connection that sends each piece it is given with its own ``send`` (a
    TLS record of its own) and reads replies whenever they come."""

    def __init__(self, cell: Cell, tls: ssl.SSLContext | None) -> None:
        self.sock = socket.socket(cell.family, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(cell.addr)
        if cell.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.out = bytearray()  # bytes for the wire, not yet sent
        self.got = bytearray()  # replies (plaintext)
        self.closed = False  # the server closed (EOF or reset)
        self.write_dead = False  # the server stopped reading (EPIPE, reset)
        self.tls: ssl.SSLObject | None = None
        if tls is not None:
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = tls.wrap_bio(self._in, self._out, server_hostname="127.0.0.1")
            self._handshake()

    def _handshake(self) -> None:
        assert self.tls is not None
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.out += self._out.read()
                self.pump(None, wait=True, once=True)
                if self.closed:
                    raise AssertionError("the server closed during the TLS handshake") from None
        self.out += self._out.read()

    def queue(self, data: bytes) -> None:
        if self.tls is None:
            self.out += data
        else:
            self.tls.write(data)
            self.out += self._out.read()

    def shut_write(self) -> None:
        """Half-close: the client sends nothing more (TCP FIN; no close_notify under
        TLS either: like a raw client's ``shutdown(SHUT_WR)``)."""
        self.flush()
        if not self.write_dead:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.write_dead = True

    def flush(self) -> None:
        while self.out and not self.write_dead and not self.closed:
            self.pump(None, wait=True, once=True)

    def _received(self, data: bytes) -> None:
        if self.tls is None:
            self.got += data
            return
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        while True:
            try:
                plain = self.tls.read(1 << 20)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                plain = b""
            if not plain:  # close_notify, or the end of the stream without one
                self.closed = True
                break
            self.got += plain
        self.out += self._out.read()  # a key update, say

    def pump(self, want: int | None, wait: bool, once: bool = False) -> None:
        """Send and read until ``want`` reply bytes have come (None: to the close);
        ``wait``: block up to TIMEOUT for them (else: only what is ready now); ``once``:
        one round of progress."""
        deadline = time.monotonic() + TIMEOUT
        while not self.closed and (want is None or len(self.got) < want):
            writing = bool(self.out) and not self.write_dead
            left = deadline - time.monotonic() if wait else 0.0
            if left < 0:
                raise AssertionError(f"no progress within {TIMEOUT} s; have {len(self.got)} bytes")
            r, w, _ = select.select([self.sock], [self.sock] if writing else [], [], left)
            if not r and not w:
                if wait:
                    continue
                return
            if w:
                try:
                    del self.out[: self.sock.send(self.out)]
                except BlockingIOError:
                    pass
                except OSError:  # EPIPE, ECONNRESET: it closed after a bad request
                    self.write_dead = True
                    self.out.clear()
            if r:
                try:
                    data = self.sock.recv(1 << 20)
                except BlockingIOError:
                    data = None
                except OSError:  # reset: what came before it was read already
                    data = b""
                if data == b"":
                    if self.tls is not None:
                        self._received(b"")
                    self.closed = True
                elif data:
                    self._received(data)
            if once:
                return

    def close(self) -> None:
        self.sock.close()


def client_tls(certs: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs.ca)
    return ctx


def exchange(
    cell: Cell,
    tls: ssl.SSLContext | None,
    framing: str,
    kind: str,
    sends: list[Send],
    eof_at_once: bool,
) -> bytes:
    """Feed ``sends`` (each its own send; a synced one once the replies to what came
    before it are in), then half-close: at once, or once every reply has come. What the
    client read up to the server's close."""
    wire = Wire(cell, tls)
    try:
        for i, send in enumerate(sends):
            if send.sync and i:
                want = len(reference(framing, kind, sends[:i], eof=False))
                wire.pump(want, wait=True)
            if wire.closed or wire.write_dead:
                break  # closed after a bad request: the rest is never read
            wire.queue(send.data)
            wire.flush()
            wire.pump(None, wait=False)  # read what came, as it goes
        if not eof_at_once:
            want = len(reference(framing, kind, sends, eof=False))
            wire.pump(want, wait=True)
        wire.shut_write()
        wire.pump(None, wait=True)  # to the server's close
        return bytes(wire.got)
    finally:
        wire.close()


# -- the matrix --------------------------------------------------------------------------


def _cells(half_close: bool = False) -> Iterator[Any]:
    for path in PATHS:
        for endpoint in ["tcp"] if path == "tls" else ENDPOINTS:
            for framing in FRAMINGS:
                for kind in KINDS:
                    yield pytest.param(
                        path,
                        endpoint,
                        framing,
                        kind,
                        id=f"{framing}-{kind}-{path}-{endpoint}",
                    )


#: (test, framing, kind, stream) -> path/endpoint -> the replies it read: every path must
#: answer alike (besides equalling the reference).
ANSWERS: dict[tuple[str, str, str, str], dict[str, bytes]] = {}


def _check(
    test: str, where: str, framing: str, kind: str, stream: str, got: bytes, want: bytes
) -> None:
    """``got`` must be the reference's bytes; a failure says which other paths answered
    the same bytes and which did not (a wrong reference shows as every path agreeing)."""
    seen = ANSWERS.setdefault((test, framing, kind, stream), {})
    seen[where] = got
    if got == want:
        return
    alike = sorted(w for w, theirs in seen.items() if theirs == got and w != where)
    unlike = sorted(w for w, theirs in seen.items() if theirs != got)
    at = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
        min(len(got), len(want)),
    )
    raise AssertionError(
        f"{stream}: {len(got)} bytes, the reference {len(want)}; first difference at {at}: "
        f"got {got[at : at + 40]!r}, want {want[at : at + 40]!r}; the same bytes from "
        f"{alike or 'no other path'}, others from {unlike or 'no other path'}"
    )


def _open(
    servers: Servers, certs: Any, path: str, endpoint: str, framing: str, kind: str
) -> tuple[Cell, ssl.SSLContext | None]:
    if path == "c":
        require(_speedups is not None, "sockserve._speedups is not built")
    return servers.cell(path, framing, kind, endpoint), client_tls(certs) if path == "tls" else None


def _check_path(cell: Cell, path: str, framing: str, kind: str) -> None:
    """The path under test is the one that answered."""
    if kind in SYNC_KINDS and path == "tls":
        assert "tlsconn.py" in cell.modules, cell.modules  # TLS is served on the hub
    elif kind in SYNC_KINDS:
        want = fast_caller(path, framing)
        assert any(c[: len(want)] == want for c in cell.callers), (path, cell.callers)
    if kind == "blocking":
        assert cell.threads and all(t.startswith("sockserve-handler-") for t in cell.threads)


@pytest.mark.parametrize(("path", "endpoint", "framing", "kind"), list(_cells()))
def test_replies_are_identical(
    servers: Servers, certs: Any, path: str, endpoint: str, framing: str, kind: str
) -> None:
    cell, tls = _open(servers, certs, path, endpoint, framing, kind)
    for name, sends in streams(framing).items():
        got = exchange(cell, tls, framing, kind, sends, eof_at_once=False)
        want = reference(framing, kind, sends, eof=True)
        _check("replies", f"{path}-{endpoint}", framing, kind, name, got, want)
    _check_path(cell, path, framing, kind)


@pytest.mark.parametrize(("path", "endpoint", "framing", "kind"), list(_cells(True)))
def test_a_half_close_is_answered_in_full(
    servers: Servers, certs: Any, path: str, endpoint: str, framing: str, kind: str
) -> None:
    cell, tls = _open(servers, certs, path, endpoint, framing, kind)
    for name, sends in half_close_streams(framing).items():
        got = exchange(cell, tls, framing, kind, sends, eof_at_once=True)
        want = reference(framing, kind, sends, eof=True)
        _check("half-close", f"{path}-{endpoint}", framing, kind, name, got, want)


# -- a protocol error: replies still being computed are written before the close -------


@pytest.mark.parametrize("engine", ["auto", "asyncio"])
@pytest.mark.parametrize("kind", ["blocking", "async"])
@pytest.mark.parametrize("framing", ["line", "length"])
def test_requests_before_a_protocol_error_are_answered_by_threads_and_tasks(
    engine: str, kind: str, framing: str, server_logs: Any
) -> None:
    """Line: an over-long line behind two whole ones in one chunk; length: two whole
    frames, then the stream ends inside a prefix. A sync handler answers both; the
    threads and tasks must too, before the close."""
    gate = threading.Event()

    def hold() -> None:
        # Until the server logged the error: it closed at once (the bug), or it waits
        # for these replies (then the log line comes only after them: the wait ends).
        with contextlib.suppress(AssertionError):
            server_logs.wait_for("protocol error", timeout=2.0)
        gate.set()

    @sockserve.blocking
    def in_thread(request: bytes, ctx: sockserve.Context) -> bytes:
        gate.wait(TIMEOUT)
        return request.upper()

    async def in_task(request: bytes, ctx: sockserve.Context) -> bytes:
        while not gate.is_set():
            await asyncio.sleep(0.005)
        return request.upper()

    handler = in_thread if kind == "blocking" else in_task

    codec = make_codec(framing, 8)
    if framing == "line":
        data, eof = b"a\nb\n" + b"x" * 20 + b"\n", False
    else:
        data, eof = b"\0\0\0\x01a\0\0\0\x01b\0\0", True
    url = "tcp://127.0.0.1:0"
    with (
        ServerThread(handler, url, framing=framing, max_message=8, engine=engine) as srv,
        socket.create_connection(addr_of(srv.url("tcp")), timeout=TIMEOUT) as sock,
    ):
        sock.sendall(data)
        if eof:
            sock.shutdown(socket.SHUT_WR)
        hold()
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
    assert got == codec.encode(b"A") + codec.encode(b"B")


# -- the reference itself ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=6).map(lambda b: b.replace(b"#", b"")) | st.just(b"#")),
    cuts=st.lists(st.integers(0, 200)),
    kind=st.sampled_from(["inline", "blocking", "async", "none"]),
)
def test_raw_replies_do_not_depend_on_where_the_stream_is_cut(
    messages: list[bytes], cuts: list[int], kind: str
) -> None:
    """Why raw framing can be compared at all: without a trigger, a raw reply stream is
    the same bytes however the reads cut the input (the server's reads are not ours)."""
    whole = b"".join(messages)
    at = sorted({0, len(whole), *(c for c in cuts if c < len(whole))})
    sends = [Send(whole[a:b]) for a, b in itertools.pairwise(at)]
    assert reference("raw", kind, sends, eof=True) == reference(
        "raw", kind, [Send(whole)], eof=True
    )


@pytest.mark.parametrize("framing", FRAMINGS)
def test_the_streams_reach_what_they_are_for(framing: str) -> None:
    """Each special kind answers the streams differently from the plain one (so a path
    that ignored the difference fails), and the cap stream reaches the cap."""
    for name, sends in streams(framing).items():
        plain = reference(framing, "inline", sends, eof=True)
        for kind in ("none", "raises", "nonbytes"):
            if name != "max-message" and (kind == "none" or name != "pipelined"):
                assert reference(framing, kind, sends, eof=True) != plain, (name, kind)
    cap = reference(framing, "inline", streams(framing)["max-message"], eof=True)
    assert transform(b"m" * CAP) in cap
    after = make_codec(framing, CAP).encode(transform(b"after"))
    assert cap.endswith(after) == (framing == "raw")  # the one over the cap closes
