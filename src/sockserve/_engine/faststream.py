"""One request/reply stream connection served straight from the epoll hub (:mod:`.epoll`).

Error handling: OS errors on the socket close that connection, logged with its
reason. Resource handling: reading stops while unsent replies exceed the
high-water mark or async requests queue up, exactly like the transport path.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ..errors import ProtocolError
from ..framing import Codec, make_codec
from ..service import Context
from .contracts import ConnOwner, Poller
from .epoll import _ERR, _IN, _IN_OR_ERR, _OUT
from .fastio import (
    DATA,
    EOF,
    ERRNO,
    KIND_LENGTH,
    KIND_LINE,
    KIND_RAW,
    PARTIAL,
    RAISED,
    REPLY,
    stream_recv,
    stream_send,
)
from .fastpath import answer, handler_raised
from .requests import PAUSE_WRITE, RequestQueue
from .stream import QueuedConn

#: Bytes read per recv: a whole 64 KiB message in one call, like uvloop's read size.
READ_SIZE = 65536
#: The fast path's framing kind of each framing it serves (the contract in ``fastio``).
FAST_KINDS = {"raw": KIND_RAW, "line": KIND_LINE, "length": KIND_LENGTH}


class FastStream(QueuedConn):
    """One request/reply stream connection served straight from the hub.

    A connection to its owner (:class:`~.contracts.Conn`), like the transport-based
    ``StreamProtocol``, and the host of its :class:`~.requests.RequestQueue`
    (:class:`~.contracts.QueueHost`).
    """

    __slots__ = (
        "_codec",
        "_events",
        "_fast",
        "_handler",
        "_high",
        "_kind",
        "_low",
        "_max",
        "_out",
        "_out_size",
        "active",
        "calls",
        "closing",
        "ctx",
        "eof",
        "fd",
        "hub",
        "idle_since",
        "requests",
        "rt",
        "sock",
    )

    def __init__(self, rt: ConnOwner, hub: Poller, sock: socket.socket, peer: Any) -> None:
        cfg = rt.config
        self.rt = rt
        self.hub = hub
        self.sock = sock
        self.fd = sock.fileno()
        self.ctx = Context(peer, rt.endpoint)
        self._handler = rt.handler
        self._max = cfg.max_message
        #: How the handler is called; while it runs inline (calls.inline), whole requests
        #: are answered by the fast path (raw framing: each chunk inline, no codec, made
        #: lazily; line and length: split there, the codec holds what a chunk left
        #: unfinished, and the connection is fast while it holds none).
        self.calls = calls = rt.calls
        self._kind = FAST_KINDS.get(cfg.framing, -1)
        self._fast = self._kind >= 0 and not calls.is_async
        raw_fast = self._fast and self._kind == KIND_RAW
        self._codec: Codec | None = None if raw_fast else make_codec(cfg.framing, cfg.max_message)
        self._high = cfg.write_high_water
        self._low = cfg.write_low_water
        self._out: list[bytes] | None = None
        self._out_size = 0
        self.eof = False
        self._events = _IN
        self.closing = False
        self.active = True
        self.idle_since = 0.0
        self.requests = RequestQueue(self, rt, self.ctx, hub)
        hub.add(self.fd, self, _IN)
        rt.opened(self)

    # -- events ------------------------------------------------------------------------

    def fast_spec(self) -> tuple[FastStream, Any, Context, int, int] | None:
        """What the fast path needs to answer this connection's plain requests itself:
        None while its handler may not run there, or its codec holds part of a request."""
        if not self._fast or not self.calls.fast_ok:
            return None
        if self._codec is not None and self._codec.buffered:
            return None
        return (self, self._handler, self.ctx, self._max, self._kind)

    def _sync_fast(self) -> None:
        """After the codec took input: fast again once it holds nothing, else not."""
        if self._fast and self.fd >= 0 and self._events == _IN:
            self.hub.set_fast(self.fd, self.fast_spec())

    def on_fast_result(self, tag: int, value: Any) -> None:
        """Finish what the fast path began (the outcomes of the contract in ``fastio``)."""
        if tag == REPLY:
            self._send(value)
        elif tag == PARTIAL:
            if self._out:  # framed replies gathered after Python began writing
                self._write(value)
            else:
                self._hold(value)
        elif tag == RAISED:
            handler_raised(self, value)
        elif tag == DATA:
            if not self.closing:  # what a chunk left: the codec continues from there
                self._received(value)
        elif tag == EOF:
            self._on_eof()
        elif tag == ERRNO:
            self._finish(OSError(value, os.strerror(value)))

    def on_event(self, events: int) -> None:
        if self._events & _IN and events & _IN_OR_ERR:
            self._on_readable()
        elif events & _ERR:
            # Reset or hung up while we were not reading: a pending reply cannot be delivered.
            if self._out:
                self._flush()  # raises inside: ends the connection with the real error
            if self.fd >= 0 and events & _ERR:
                self._finish(None)
            return
        if events & _OUT and self.fd >= 0:
            self._flush()

    def _on_readable(self) -> None:
        try:
            data = stream_recv(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(exc)
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        if not data:
            self._on_eof()
            return
        calls = self.calls
        if self._fast and self._kind == KIND_RAW and calls.inline:
            started = time.perf_counter() if calls.auto else 0.0
            tag, value = answer(self, self._handler, self.ctx, self._max, data)
            if started:
                calls.took(started)
            if tag != DATA:
                if tag:
                    self.on_fast_result(tag, value)
                return
        elif self._kind == KIND_RAW and len(data) <= self._max and not self.requests.paused:
            # Raw framing, a handler that is not called inline (async, or in the threads):
            # the chunk is one request, as the codec would give it when it holds nothing.
            codec = self._codec
            if not self.closing and (codec is None or not codec.buffered):
                self.requests.dispatch(data)
                return
        codec = self._get_codec()
        try:
            codec.feed(data)
            self._drain_codec()
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._sync_fast()

    def _get_codec(self) -> Codec:
        if self._codec is None:
            self._codec = make_codec(self.rt.config.framing, self._max)
        return self._codec

    def _on_eof(self) -> None:
        self.eof = True
        self.stop_reading()
        codec = self._codec  # None: raw fast path, nothing buffered, nothing left to answer
        if codec is not None and not self.requests.answer_rest(codec):
            return
        if not self.requests.busy:
            self.close()  # flush what is written, then close

    # -- requests ----------------------------------------------------------------------

    def _send(self, reply: object) -> None:
        if reply is None or self.fd < 0:
            return
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            self.requests.bad_reply(reply)
            return
        codec = self._codec
        self._write(codec.encode(bytes(reply)) if codec is not None else bytes(reply))

    send_reply = _send

    # -- writing and flow control ------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._out:
            self._out.append(data)
            self._out_size += len(data)
            if self._out_size > self._high:
                self.requests.pause(PAUSE_WRITE)
            return
        sent = self._send_now(data)
        if sent is not None and sent < len(data):
            self._hold(data[sent:])

    def _send_now(self, data: bytes) -> int | None:
        """Send what the kernel takes now: how much (0 when its buffer is full), or None
        when the socket failed (the connection is finished)."""
        try:
            return stream_send(self.fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._finish(exc)
            return None

    def _hold(self, rest: bytes) -> None:
        """Keep what the kernel did not take; send it when the socket is writable."""
        self._out = [rest]
        self._out_size = len(rest)
        self._update_events()
        if self._out_size > self._high:
            self.requests.pause(PAUSE_WRITE)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        sent = self._send_now(data)
        if sent is None:
            return
        if sent < len(data):
            self._out = [data[sent:]]
            self._out_size = len(data) - sent
        else:
            self._out = None
            self._out_size = 0
        requests = self.requests
        if self._out_size <= self._low and requests.paused & PAUSE_WRITE:
            requests.resume(PAUSE_WRITE)
        if not self._out:
            if self.closing and not requests.busy:
                self._finish(None)
                return
            self._update_events()

    # -- what the request queue drives (QueueHost) -------------------------------------

    def stop_reading(self) -> None:
        self._set_events(self._events & _OUT)

    def can_resume(self) -> bool:
        return not self.closing and self.fd >= 0

    def start_reading(self) -> None:
        if not self.eof:
            self._set_events(_IN | (self._events & _OUT))

    def codec_now(self) -> Codec:
        return self._get_codec()

    def _update_events(self) -> None:
        self._set_events((self._events & _IN) | (_OUT if self._out else 0))

    def _set_events(self, want: int) -> None:
        if want != self._events and self.fd >= 0:
            self._events = want
            self.hub.modify(self.fd, want)

    @property
    def write_buffer_size(self) -> int:
        """Reply bytes accepted but not yet taken by the kernel."""
        return self._out_size

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet a whole request."""
        return self._codec.buffered if self._codec is not None else 0

    # -- failures and closing ----------------------------------------------------------

    def close(self) -> None:
        """Stop reading; close once the replies already written are flushed."""
        self.closing = True
        if self.fd < 0:
            return
        if not self._out:
            self._finish(None)
        else:
            self.stop_reading()

    def abort(self) -> None:
        self.closing = True
        self._out = None
        self._out_size = 0
        self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        if self.fd < 0:
            return
        self.hub.remove(self.fd)
        self.fd = -1
        self.closing = True
        self.sock.close()
        self.requests.cancel()
        self.rt.closed(self, exc)
