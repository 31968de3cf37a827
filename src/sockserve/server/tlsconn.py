"""TLS request/reply connections on the epoll hub: ``ssl.SSLObject`` over memory BIOs.

Why not an asyncio TLS transport: there each event costs the loop's dispatch, the TLS
layer's read loop and ``data_received``, each reply ``transport.write`` through its buffers.
Here one readable event is one pass: recv 64 KiB into the incoming BIO, decrypt every whole
record, answer, encrypt the replies, one ``send`` of what the outgoing BIO holds. With the
C helper that pass is one call (``tls_serve``, tls.c: no Python frame but the handler's);
else ``_pass``. The handshake runs here too (--tls-handshake-timeout; the runtime counts it
against --max-handshakes and calls :meth:`TlsStream.cancel` on the oldest). Closing sends
``close_notify``; a client that half-closes still gets the replies to what it sent.

Error handling: OS and TLS errors close that connection, logged with the reason. Resource
handling: reading stops while unsent (encrypted) replies pass the high-water mark or async
requests queue up, as on every other path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

from .._engine import fastio
from .._engine.epoll import _IN, _OUT
from .._engine.fastio import DATA, EOF, ERRNO, PARTIAL, RAISED, REPLY, stream_recv
from .._engine.fastpath import answer, handler_raised
from .._engine.faststream import FastStream
from .._engine.requests import RequestQueue
from ..errors import ProtocolError
from ..framing import Codec, make_codec
from ..service import Context

if TYPE_CHECKING:
    from .._engine.contracts import Poller
    from .._engine.runtime import StreamRuntime

#: Bytes read per recv (uvloop's read size too): four full TLS records.
READ_SIZE = 65536
#: What tls_serve reports beyond the fast path's tags: the TLS layer failed (value: the
#: SSLError), the client sent close_notify (value: the plaintext before it, maybe b"").
TLS_ERROR, TLS_CLOSED = 8, 9
#: The C helper's one-pass ``tls_serve`` (raw framing, inline handlers); None: the Python pass.
c_tls_serve: Any = getattr(fastio._speedups, "tls_serve", None)


class TlsStream(FastStream):
    """One TLS request/reply connection on the hub: a connection to its runtime
    (:class:`~sockserve._engine.contracts.Conn`) and its request queue's host.

    A :class:`FastStream` for what the two share (the hub's events, flow control, the
    request queue's side); never on the hub's fast path (its bytes need decrypting), so
    its reading, writing and closing are its own.
    """

    def __init__(self, rt: StreamRuntime, hub: Poller, sock: socket.socket, peer: Any) -> None:
        cfg = rt.config
        assert rt.ssl_context is not None
        self.rt, self.hub, self.sock, self.fd = rt, hub, sock, sock.fileno()
        self._runtime = rt  # as its own type: the runtime that counts its handshake
        self.ctx = Context(peer, rt.endpoint)
        self._bio_in, self._bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = rt.ssl_context.wrap_bio(self._bio_in, self._bio_out, server_side=True)
        #: The ``_ssl`` object under ``ssl.SSLObject``: its methods without ssl.py's frames.
        self._obj: Any = getattr(tls, "_sslobj", tls)
        self._handler = rt.handler
        self._max = cfg.max_message
        self.calls = calls = rt.calls
        self._raw = cfg.framing == "raw" and not calls.is_async
        self._fast = False  # FastStream.fast_spec: never on the hub's fast path
        self._framing: Codec = make_codec(cfg.framing, cfg.max_message)
        self._codec = self._framing  # FastStream's name for it (buffered, codec_now, EOF)
        self._high, self._low = cfg.write_high_water, cfg.write_low_water
        self._out: list[bytes] | None = None  # ciphertext the kernel did not take yet
        self._out_size = 0
        self._in_pass = False  # inside a read pass: replies are sent together at its end
        self._soon = False  # a pass over what the incoming BIO holds is scheduled
        self.eof = self.closing = False
        self.handshaking = self.active = True
        self.idle_since = 0.0
        self._events = _IN
        self.requests = RequestQueue(self, rt, self.ctx, hub)
        timeout = cfg.tls_handshake_timeout
        self._timer: asyncio.TimerHandle | None = (
            rt.loop.call_later(timeout, self._handshake_timed_out) if timeout else None
        )
        hub.add(self.fd, self, _IN)

    # -- the handshake -----------------------------------------------------------------

    def _handshake(self) -> bool:
        """Go on with the handshake: True once it is done (the connection is open)."""
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_bio()
            return False
        except (ssl.SSLError, OSError) as exc:  # not TLS, refused certificate...
            self._setup_failed(exc)  # closed without an alert, as asyncio's TLS does
            return False
        self._handshake_over(None)
        self.rt.opened(self)
        self._flush_bio()  # the session tickets
        return self.fd >= 0 and not self.closing

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.handshaking and self.fd >= 0:
            timeout = self.rt.config.tls_handshake_timeout
            self._setup_failed(TimeoutError(f"TLS handshake not done in {timeout:g}s"))

    def cancel(self) -> None:
        """Dropped before its handshake ended (--max-handshakes, shutdown): no log line."""
        if self.handshaking and self.fd >= 0:
            self._setup_failed(asyncio.CancelledError())

    def _setup_failed(self, exc: BaseException) -> None:
        self._close_socket()
        self._handshake_over(exc)

    def _handshake_over(self, exc: BaseException | None) -> None:
        self.handshaking = False  # the runtime hears of it once
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._runtime.handshake_ended(self, exc)

    # -- events ------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self.handshaking:
            if not self._read_ciphertext() or not self._handshake():
                return
            self._pass()
            return
        calls = self.calls
        if c_tls_serve is not None and self._raw and calls.inline and not self._out:
            started = time.perf_counter() if calls.auto else 0.0
            tag, value = c_tls_serve(
                self.fd, self._obj, self._bio_in, self._bio_out, self, self._handler, self.ctx,
                self._max,
            )  # fmt: skip
            if started:
                calls.took(started)
            if tag:
                self._outcome(tag, value)
            return
        if self._read_ciphertext():
            self._pass()

    def _outcome(self, tag: int, value: Any) -> None:
        """Finish what ``tls_serve`` began (its tags: those of the fast path, and TLS_*)."""
        self._in_pass = True
        try:
            if tag == REPLY:
                self._send(value)
            elif tag == PARTIAL:
                self._hold(value)
            elif tag == RAISED:
                handler_raised(self, value)
            elif tag == DATA:
                self._received(value)
            elif tag in (TLS_CLOSED, EOF):
                if value:
                    self._received(value)  # what came before close_notify
                self._on_eof()
            elif tag in (ERRNO, TLS_ERROR):
                self._finish(OSError(value, os.strerror(value)) if tag == ERRNO else value)
        finally:
            self._in_pass = False
        self._flush_bio()

    def _read_ciphertext(self) -> bool:
        """One recv into the incoming BIO: False when there was nothing (or the end)."""
        try:
            data = stream_recv(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._finish(exc)
            return False
        if not data:
            if self.handshaking:
                self._finish(None)
            else:
                self._on_eof()
            return False
        self._bio_in.write(data)
        return True

    def _pass(self) -> None:
        """Decrypt every whole record the incoming BIO holds, answer, send the replies."""
        obj, bio = self._obj, self._bio_in
        chunks: list[bytes] = []
        closed = False
        try:
            while bio.pending or obj.pending():
                chunk = obj.read(READ_SIZE)
                if not chunk:  # close_notify (_ssl's read gives b""): nothing more comes
                    closed = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass  # a partial record: the rest comes with the next read
        except ssl.SSLZeroReturnError:
            closed = True
        except (ssl.SSLError, OSError) as exc:
            self._finish(exc)
            return
        self._in_pass = True
        try:
            if chunks:
                self._received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if closed and self.fd >= 0:
                self._on_eof()
        finally:
            self._in_pass = False
        self._flush_bio()

    def _received(self, data: bytes) -> None:
        if not data or self.closing:
            return
        calls = self.calls
        if self._raw and calls.inline:  # raw framing: the chunk is the request
            started = time.perf_counter() if calls.auto else 0.0
            tag, value = answer(self, self._handler, self.ctx, self._max, data)
            if started:
                calls.took(started)
            if tag == REPLY:
                self._send(value)
            elif tag == RAISED:
                handler_raised(self, value)
            if tag != DATA:
                return
        try:
            self._framing.feed(data)
            self._drain_codec()
        except ProtocolError as exc:
            self._protocol_error(exc)

    # -- writing and flow control ------------------------------------------------------

    def _send(self, reply: object) -> None:
        if reply is None or self.fd < 0:
            return
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            self.requests.bad_reply(reply)
            return
        try:
            self._obj.write(self._framing.encode(bytes(reply)))
        except (ssl.SSLError, OSError) as exc:
            self._finish(exc)
            return
        if not self._in_pass or self._out_size + self._bio_out.pending > self._high:
            self._flush_bio()  # now: an async or threaded handler's reply, or past the mark

    send_reply = _send

    def _flush_bio(self) -> None:
        """Send what the outgoing BIO holds (after what is still waiting, if anything)."""
        if self.fd >= 0 and self._bio_out.pending:
            self._write(self._bio_out.read())

    # -- what the request queue drives (QueueHost) -------------------------------------

    def start_reading(self) -> None:
        if self.eof or self.fd < 0:
            return
        self._set_events(_IN | (self._events & _OUT))
        if (self._bio_in.pending or self._obj.pending()) and not self._soon:
            self._soon = True  # records read before the pause: epoll will not report them
            self.rt.loop.call_soon(self._pass_soon)

    def _pass_soon(self) -> None:
        self._soon = False
        if self.fd >= 0 and self._events & _IN and not self.closing:
            self._pass()

    @property
    def write_buffer_size(self) -> int:
        """Reply bytes (encrypted) accepted but not yet taken by the kernel."""
        return self._out_size + self._bio_out.pending

    # -- failures and closing ----------------------------------------------------------

    def close(self) -> None:
        """Stop reading, send close_notify; close once the replies written are flushed."""
        self.closing = True
        if self.fd >= 0 and not self.handshaking:
            with contextlib.suppress(ssl.SSLError, OSError):  # close_notify, sent once; the
                self._obj.shutdown()  # client's is not awaited (SSLWantReadError)
            self._flush_bio()
        if self.fd >= 0 and not self._out:
            self._finish(None)
        elif self.fd >= 0:
            self.stop_reading()

    def abort(self) -> None:
        self.closing = True
        if self.fd >= 0 and not self.handshaking and not self._out and self._bio_out.pending:
            # Replies encrypted earlier in this pass, which every other path has sent by
            # now (a handler raising on a later request of the chunk must not lose them).
            self._send_now(self._bio_out.read())
        self._out = None
        self._out_size = 0
        if self.handshaking:
            self.cancel()
        else:
            self._finish(None)

    def _close_socket(self) -> None:
        if self.fd >= 0:
            self.hub.remove(self.fd)
            self.fd = -1
            self.closing = True
            self.sock.close()

    def _finish(self, exc: Exception | None) -> None:
        if self.fd < 0:
            return
        if self.handshaking:  # before it opened: a failed setup
            self._setup_failed(exc or ConnectionResetError("closed during the TLS handshake"))
            return
        self._close_socket()
        self.requests.cancel()
        self.rt.closed(self, exc)
