"""TLS request/reply connections answer byte for byte like the codec says on both hub
paths: the C helper's one-call pass (``tls_serve``) and the Python pass; sync, async and
threaded handlers. (asyncio's TLS transport, still used with ``engine="asyncio"``, is not
held to this: uvloop's never tells the protocol of a TCP half-close, so the last,
unterminated message and the replies still pending are lost there.)

The client is an ``ssl.SSLObject`` over a plain socket, so it decides what goes in each TLS
record (a message split at every byte: records of one byte; several messages per record)
and can half-close the TCP stream (``SHUT_WR``) or send ``close_notify`` while it waits for
the replies. Also here: session resumption (TLS 1.3 tickets), ``close_notify`` when the
server closes, and a client that stops reading mid-reply (the server stops reading too,
and every reply still arrives once it reads again).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faultkit import Certs
from strict import require
from support import addr_of, wait_for

from sockserve.errors import ProtocolError
from sockserve.framing import make_codec
from sockserve.server import ServerThread, tlsconn

try:
    from sockserve import _speedups
except ImportError:  # not built: CI (CI=true) fails the C path instead of skipping it
    _speedups = None  # type: ignore[assignment]

pytestmark = pytest.mark.timeout(120)

CAP = 8
PATHS = ["c", "python"]
KINDS = ["sync", "async", "threaded"]


def reply_to(request: bytes) -> Any:
    if request == b"none":
        return None
    if request.startswith(b"big"):
        return request * 20_000
    return b"<" + request + b">"


def messages(framing: str, data: bytes, eof: bool = True) -> tuple[list[bytes], bool]:
    """The messages the codec finds in ``data`` (then the end of input), and whether a
    protocol error ends them."""
    codec = make_codec(framing, CAP)
    msgs = []
    try:
        codec.feed(data)
        while (msg := codec.next_message()) is not None:
            msgs.append(msg)
        last = codec.end_of_input() if eof else None
        msgs += [last] if last is not None else []
    except ProtocolError:
        return msgs, True
    return msgs, False


def expected(framing: str, data: bytes, eof: bool = True) -> bytes:
    """What the codec says ``data`` earns: each message's framed reply, to a protocol error."""
    codec = make_codec(framing, CAP)
    out = b""
    for msg in messages(framing, data, eof)[0]:
        reply = reply_to(msg)
        if reply is not None:
            out += codec.encode(reply)
    return out


def handler_of(kind: str) -> Any:
    if kind == "async":

        async def handler(request: bytes, ctx: Any) -> Any:
            await asyncio.sleep(0)
            return reply_to(request)

        return handler

    def sync_handler(request: bytes, ctx: Any) -> Any:
        return reply_to(request)

    return sync_handler


class TlsClient:
    """A TLS client over a plain socket: it chooses the records and how to end."""

    def __init__(self, addr: tuple[str, int], ca: str) -> None:
        ctx = ssl.create_default_context(cafile=ca)
        self.sock = socket.create_connection(addr, timeout=10)
        self.bio_in, self.bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.bio_in, self.bio_out, server_hostname="localhost")
        self.got = b""
        self.close_notify = False  # the server ended with close_notify (not a bare FIN)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._read_some()
        self._flush()

    def _flush(self) -> None:
        if self.bio_out.pending:
            self.sock.sendall(self.bio_out.read())

    def _read_some(self) -> bool:
        if not select.select([self.sock], [], [], 10)[0]:
            raise AssertionError(f"nothing from the server within 10 s; have {len(self.got)}")
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            self.bio_in.write_eof()
            return False
        self.bio_in.write(data)
        return True

    def send(self, data: bytes, record: int | None = None) -> None:
        """``data`` in records of ``record`` bytes (one record: None)."""
        step = record or max(len(data), 1)
        for at in range(0, len(data), step):
            self.tls.write(data[at : at + step])
        self._flush()

    def _decrypt(self) -> bool:
        """Plaintext into ``got``: False once the server's stream has ended."""
        while True:
            try:
                chunk = self.tls.read(1 << 20)
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLZeroReturnError:  # close_notify (after ours, or read again)
                self.close_notify = True
                return False
            except ssl.SSLEOFError:
                return False
            if not chunk:  # _ssl's read gives b"" at close_notify
                self.close_notify = True
                return False
            self.got += chunk

    def read(self, want: int) -> bytes:
        while self._decrypt() and len(self.got) < want and self._read_some():
            pass
        out, self.got = self.got[:want], self.got[want:]
        return out

    def end(self, how: str) -> bytes:
        """Half-close (``fin``: SHUT_WR; ``notify``: close_notify, then SHUT_WR) and read
        everything to the server's close."""
        with contextlib.suppress(OSError):  # ENOTCONN, EPIPE: closed after a protocol error
            if how == "notify":
                with contextlib.suppress(ssl.SSLWantReadError):
                    self.tls.unwrap()
                self._flush()
            self.sock.shutdown(socket.SHUT_WR)
        while self._decrypt() and self._read_some():
            pass
        self._decrypt()
        self.sock.close()
        return self.got


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "c":
        require(_speedups is not None, "sockserve._speedups is not built")
        monkeypatch.setattr(tlsconn, "c_tls_serve", _speedups.tls_serve)
    else:
        monkeypatch.setattr(tlsconn, "c_tls_serve", None)
    return str(request.param)


@pytest.fixture
def tls_serve(certs: Certs, path: str) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(handler: Any, **options: Any) -> ServerThread:
        st = ServerThread(
            handler, "tls://127.0.0.1:0", tls_cert=certs.server_cert,
            tls_key=certs.server_key, **options,
        )  # fmt: skip
        st.start()
        started.append(st)
        return st

    yield start
    for st in started:
        st.stop()


def frames(*bodies: bytes) -> bytes:
    return b"".join(len(b).to_bytes(4, "big") + b for b in bodies)


STREAMS = {
    "line": [b"one\ntwo\r\n\n\r\nlast", b"none\nx\n12345678\n123456789\nafter\n", b"big\nok\n"],
    "length": [frames(b"", b"a", b"bcd"), frames(b"none", b"12345678", b"after"), frames(b"big")],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("framing", ["line", "length"])
def test_framed_replies_alike_in_records_of_every_size(
    path: str, kind: str, framing: str, tls_serve: Callable[..., ServerThread], certs: Certs
) -> None:
    """Whole streams in one record, in records of 1 byte and of 3, and cut in two at every
    byte (the first part answered before the rest is sent, in 1-byte records); then a
    half-close (a FIN, or close_notify), and the server's close_notify."""
    st = tls_serve(handler_of(kind), framing=framing, max_message=CAP, blocking=kind == "threaded")
    addr = addr_of(st.url("tls"))
    for stream in STREAMS[framing]:
        if kind != "sync" and messages(framing, stream)[1]:
            continue  # a protocol error drops the replies still queued (TCP does the same)
        want = expected(framing, stream)
        for record, how in ((None, "fin"), (1, "notify"), (3, "fin")):
            client = TlsClient(addr, certs.ca)
            client.send(stream, record)
            got = client.end(how)
            assert got == want, (path, kind, stream, record, how)
            assert client.close_notify, "the server closed without close_notify"
        for cut in range(1, len(stream)):
            client = TlsClient(addr, certs.ca)
            try:
                client.send(stream[:cut])
                first = client.read(len(expected(framing, stream[:cut], eof=False)))
                client.send(stream[cut:], 1)
            except OSError:  # closed after a protocol error in the first part
                first = client.got
                client.got = b""
            assert first + client.end("fin") == want, (path, kind, stream, cut)


@pytest.mark.parametrize("kind", KINDS)
def test_raw_replies_and_half_close(
    path: str, kind: str, tls_serve: Callable[..., ServerThread], certs: Certs
) -> None:
    """Raw framing: each request answered as sent (the C pass on the ``c`` path; a reply
    the kernel does not take at once, or a request that comes with close_notify, is
    finished in Python), then the last request and a half-close at once: its reply still
    comes (a TCP FIN or close_notify), then close_notify."""
    callers: set[str] = set()
    inner = handler_of(kind)

    def spy(request: bytes, ctx: Any) -> Any:
        callers.add(sys._getframe(1).f_code.co_name)
        return inner(request, ctx)

    handler = inner if kind == "async" else spy
    st = tls_serve(handler, blocking=kind == "threaded")
    addr = addr_of(st.url("tls"))
    client = TlsClient(addr, certs.ca)
    for size in (1, 64, 1000, 16000):
        request = bytes(range(256)) * (size // 256) + b"r" * (size % 256)
        client.send(request)
        reply = reply_to(request)
        assert client.read(len(reply)) == reply
    if kind == "sync":  # the path that answered: C calls the handler from _on_readable
        assert callers == {"_on_readable" if path == "c" else "answer"}, callers
    client.send(b"big one")
    assert client.read(len(reply_to(b"big one"))) == reply_to(b"big one")
    for how in ("fin", "notify"):
        client = TlsClient(addr, certs.ca)
        client.send(b"last words")
        assert client.end(how) == b"<last words>", (path, kind, how)
        assert client.close_notify


def test_tls13_session_tickets_resume(
    path: str, tls_serve: Callable[..., ServerThread], certs: Certs
) -> None:
    """The server sends TLS 1.3 session tickets, and a client that offers one resumes
    (no certificate exchange: a cheaper handshake)."""
    st = tls_serve(handler_of("sync"))
    ctx = ssl.create_default_context(cafile=certs.ca)
    addr = addr_of(st.url("tls"))
    with ctx.wrap_socket(
        socket.create_connection(addr, timeout=10), server_hostname="localhost"
    ) as s:
        s.sendall(b"first")
        assert s.recv(100) == b"<first>"  # the tickets came before the reply
        session = s.session
        assert session is not None and s.version() == "TLSv1.3" and not s.session_reused
    with ctx.wrap_socket(
        socket.create_connection(addr, timeout=10), server_hostname="localhost", session=session
    ) as s:
        s.sendall(b"again")
        assert s.recv(100) == b"<again>"
        assert s.session_reused


def test_a_client_that_stops_reading_is_paused_then_served(
    path: str, tls_serve: Callable[..., ServerThread], certs: Certs
) -> None:
    """Pipelined requests whose replies (12 MB) the client does not read: the server stops
    reading (its unsent ciphertext bounded by the high-water mark), serves other clients,
    and once the client reads, every reply arrives in order."""
    st = tls_serve(handler_of("sync"), framing="line", max_message=CAP)
    addr = addr_of(st.url("tls"))
    stalled = TlsClient(addr, certs.ca)
    requests = b"".join(b"big%d\n" % (i % 10) for i in range(150))
    want = expected("line", requests)
    stalled.send(requests)
    [rt] = st.server.streams

    def conns() -> list[tlsconn.TlsStream]:
        return [c for c in list(rt.conns) if isinstance(c, tlsconn.TlsStream)]

    wait_for(lambda: any(c.paused for c in conns()), what="reading paused")
    [conn] = [c for c in conns() if c.paused]
    assert conn.write_buffer_size <= rt.config.write_high_water + len(reply_to(b"big0")) * 2
    other = TlsClient(addr, certs.ca)
    other.send(b"hi\n")
    assert other.end("fin") == b"<hi>\n"
    assert stalled.read(len(want)) == want
    assert stalled.end("fin") == b""


def test_silent_clients_over_max_handshakes_are_dropped_and_their_slots_freed(
    path: str, tls_serve: Callable[..., ServerThread], certs: Certs
) -> None:
    """On the hub too: past --max-handshakes the oldest handshake is dropped (counted, not
    logged per client), the connection slots come back, and a real client is served."""
    st = tls_serve(handler_of("sync"), max_handshakes=10)
    addr = addr_of(st.url("tls"))
    silent = [socket.create_connection(addr, timeout=10) for _ in range(30)]
    try:
        [rt] = st.server.streams
        wait_for(lambda: rt.errors.get("handshake_evicted", 0) >= 20, what="the oldest dropped")
        assert len(rt._handshakes) <= 10 and rt.pending <= 10
        client = TlsClient(addr, certs.ca)
        client.send(b"real")
        assert client.end("fin") == b"<real>"
    finally:
        for s in silent:
            s.close()
    wait_for(lambda: st.server.budget.count == 0 and rt.pending == 0, what="every slot freed")


def test_a_context_swapped_by_reload_serves_new_handshakes_only(
    path: str, tls_serve: Callable[..., ServerThread], certs: Certs
) -> None:
    """What SIGHUP's certificate refresh does (deploy/app.py sets ``rt.ssl_context``): new
    handshakes use the new context (here one requiring client certificates), connections
    already open keep theirs."""
    from sockserve.server.tls import server_context

    st = tls_serve(handler_of("sync"))
    addr = addr_of(st.url("tls"))
    before = TlsClient(addr, certs.ca)
    [rt] = st.server.streams
    rt.ssl_context = server_context(certs.server_cert, certs.server_key, certs.ca)
    try:  # no client certificate: refused (TLS 1.3: after the client's side is done)
        refused = TlsClient(addr, certs.ca)
        refused.send(b"x")
        assert refused.end("fin") == b"", "served without a client certificate"
    except (ssl.SSLError, ConnectionError):
        pass  # refused during the client's handshake, or its send
    before.send(b"still")
    assert before.end("fin") == b"<still>"
