"""Stream connections (TCP, TLS, Unix): request/reply over a codec, or a stream session.

Error handling: a framing error or a handler exception is logged with the peer
and endpoint, and closes only that connection. Resource handling: reading pauses
while unsent replies pass the high-water mark or async requests queue up, so a
client that sends but never reads costs bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import Any, cast

from ..errors import ProtocolError
from ..framing import Codec, make_codec
from ..logs import conn_log, fmt_peer, service_log
from ..service import Context, StreamSession
from .contracts import ConnOwner
from .fastio import DATA, RAISED, REPLY
from .fastpath import answer, handler_raised
from .requests import PAUSE_WRITE, RequestQueue
from .signals import is_signal_interrupt


class QueuedConn:
    """A connection whose requests a :class:`RequestQueue` answers, as others see it: its
    owner (``busy``, ``drain``), the fast path (``_handler_failed``, ``_drain_codec``,
    ``_protocol_error``) and introspection (``paused``, ``queued``). Needs ``requests``.
    """

    __slots__ = ()
    requests: RequestQueue

    @property
    def busy(self) -> bool:
        return self.requests.busy

    @property
    def paused(self) -> bool:
        return bool(self.requests.paused)

    @property
    def queued(self) -> int:
        """Requests waiting for the async handler."""
        return self.requests.queued

    def drain(self) -> None:
        self.requests.drain()

    def _handler_failed(self) -> None:
        self.requests.handler_failed()

    def _drain_codec(self) -> None:
        self.requests.drain_codec()

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.requests.protocol_error(exc)


class TransportConn(asyncio.Protocol):
    """What every connection on an asyncio transport shares: the owner it reports to
    (``rt``), its context, the idle sweeper's marks, and a plain close and abort."""

    __slots__ = ("_transport", "active", "closing", "ctx", "idle_since", "rt")

    def __init__(self, rt: ConnOwner, peer: Any) -> None:
        self.rt = rt
        self.ctx = Context(peer, rt.endpoint)
        self._transport: asyncio.Transport | None = None
        self.closing = False
        self.active = True  # set on each request; the idle sweeper clears it
        self.idle_since = 0.0

    def _attach(self, transport: asyncio.BaseTransport) -> asyncio.Transport:
        """Keep the transport and give it this endpoint's write-buffer marks."""
        t = cast(asyncio.Transport, transport)
        self._transport = t
        cfg = self.rt.config
        t.set_write_buffer_limits(cfg.write_high_water, cfg.write_low_water)
        return t

    def close(self) -> None:
        """Close after the replies already written are flushed."""
        self.closing = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()


class StreamProtocol(TransportConn, QueuedConn):
    """One request/reply connection on an asyncio transport (TLS, PROXY, ``engine=asyncio``)."""

    __slots__ = ("_calls", "_codec", "_fast", "_handler", "eof", "requests")

    def __init__(self, rt: ConnOwner, peer: Any) -> None:
        super().__init__(rt, peer)
        self._handler = rt.handler
        self._codec: Codec = make_codec(rt.config.framing, rt.config.max_message)
        # raw framing with a handler that runs inline: each chunk answered, no codec calls.
        self._calls = rt.calls
        self._fast = rt.config.framing == "raw" and not rt.calls.is_async
        self.eof = False
        self.requests = RequestQueue(self, rt, self.ctx)

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport)
        self.rt.opened(self)

    def data_received(self, data: bytes) -> None:
        calls = self._calls
        if self._fast and calls.inline:  # the raw fast path's answer, then this transport's
            started = time.perf_counter() if calls.auto else 0.0
            tag, value = answer(self, self._handler, self.ctx, self._codec.max_message, data)
            if started:
                calls.took(started)
            if tag == REPLY:
                if type(value) is bytes:
                    self._transport.write(value)  # type: ignore[union-attr]
                else:
                    self._send(value)
                return
            if tag == RAISED:
                handler_raised(self, value)
            if tag != DATA:
                return
        try:
            self._codec.feed(data)
            self._drain_codec()
        except ProtocolError as exc:
            self._protocol_error(exc)

    def eof_received(self) -> bool:
        if not self.requests.answer_rest(self._codec):
            return self.requests.busy  # a protocol error: what runs is answered, then closed
        self.eof = True
        # True keeps the write side open until queued replies are sent; False lets the
        # transport flush what is written and close.
        return self.requests.busy

    def pause_writing(self) -> None:
        self.requests.pause(PAUSE_WRITE)

    def resume_writing(self) -> None:
        self.requests.resume(PAUSE_WRITE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.requests.cancel()
        self.rt.closed(self, exc)

    # -- what the request queue drives (QueueHost) -------------------------------------

    def _send(self, reply: object) -> None:
        if reply is None or self._transport is None or self._transport.is_closing():
            return
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            self.requests.bad_reply(reply)
            return
        self._transport.write(self._codec.encode(bytes(reply)))

    send_reply = _send

    def stop_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def can_resume(self) -> bool:
        return self._transport is not None and not self.closing

    def start_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def codec_now(self) -> Codec:
        return self._codec

    # -- introspection shared with the epoll engine's FastStream (tests, metrics) -------

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    @property
    def buffered(self) -> int:
        return self._codec.buffered


#: Longest a lingering close keeps reading a client's input (Apache's is 2 s too).
LINGER_SECONDS = 2.0


class SessionProtocol(TransportConn):
    """A connection driven by a :class:`StreamSession` (echo, chargen, discard...).

    A session that closes while the client may still send (time, daytime, qotd close
    right after writing) does a lingering close, as Apache does: half-close, then read
    and drop the client's input until its EOF or :data:`LINGER_SECONDS`. A plain close
    with unread input makes the kernel answer with RST, and an RST makes the client's
    kernel throw away the reply it had not read yet.
    """

    __slots__ = ("_eof", "_linger", "_own_pause", "lost", "session", "writable")

    def __init__(self, rt: ConnOwner, peer: Any) -> None:
        super().__init__(rt, peer)
        self.writable = True
        self._eof = False  # the peer half-closed: never resume reading (uvloop would re-read EOF)
        self._linger: asyncio.TimerHandle | None = None  # set while lingering
        #: Why the connection ended, once it has (None: an orderly close), for on_close.
        self.lost: Exception | None = None
        assert rt.service.stream is not None
        self.session: StreamSession = rt.service.stream(self)
        # Echo-style backpressure (pause reading while our own writes back up) unless the
        # session paces this side itself (a relay: the far side's buffer decides).
        self._own_pause = self.session.pause_on_full

    # StreamConnection API offered to the session
    def write(self, data: bytes) -> None:
        # Not after close(): a lingering close has half-closed the socket (a write would
        # raise), and the session is done either way.
        if not self.closing and self._transport is not None and not self._transport.is_closing():
            self.active = True
            self._transport.write(data)
        else:
            self.closing = True  # tells producers (chargen) to stop

    def shutdown_write(self) -> bool:
        """Half-close (FIN after what is buffered); False where there is none (TLS)."""
        if self._transport is not None and self._transport.can_write_eof():
            self._transport.write_eof()
            return True
        return False

    def get_extra_info(self, name: str) -> Any:
        """The transport's ``get_extra_info`` (``sockname``: where the client connected)."""
        return self._transport.get_extra_info(name) if self._transport is not None else None

    def pause_reading(self) -> None:
        """Stop reading this connection (a session pacing it by another's write buffer)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self.closing and not self._eof:
            self._transport.resume_reading()

    def reset(self) -> None:
        """Abort with an RST (SO_LINGER 0), not a FIN: how a relay passes a reset on."""
        set_linger_zero(self._transport)
        self.abort()

    def close(self) -> None:
        """Flush, half-close and linger (see the class docstring); a plain close once
        the client's EOF has come, or where there is no half-close (TLS)."""
        self.closing = True
        t = self._transport
        if t is None or t.is_closing():
            return
        if self._eof or self._linger is not None or not t.can_write_eof():
            t.close()
            return
        t.write_eof()  # the FIN goes out after the bytes still buffered
        bound = LINGER_SECONDS
        if self.rt.config.idle_timeout is not None:
            bound = min(bound, self.rt.config.idle_timeout)
        self._linger = self.rt.loop.call_later(bound, t.close)
        t.resume_reading()  # reading may be paused by backpressure: drain the input

    @property
    def write_room(self) -> int:
        if self._transport is None:
            return 0
        return max(0, self.rt.config.write_high_water - self._transport.get_write_buffer_size())

    @property
    def busy(self) -> bool:
        return False

    def drain(self) -> None:
        self.close()

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._attach(transport)
        self.rt.opened(self)
        self._call("on_connect")

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            return  # lingering: the session is done, the input is dropped
        self.active = True
        self._call("on_data", data)

    def eof_received(self) -> bool:
        self._eof = True
        if self._linger is not None:
            return False  # the lingering close is over: close now
        self._call("on_eof")
        return not self.closing

    def pause_writing(self) -> None:
        self.writable = False
        if (
            self._own_pause
            and self._transport is not None
            and not self._eof
            and self._linger is None
        ):
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self.writable = True
        if self._own_pause and self._transport is not None and not self.closing and not self._eof:
            self._transport.resume_reading()
        self._call("on_writable")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        self.lost = exc
        self._call("on_close")
        self.rt.closed(self, exc)

    def _call(self, name: str, *args: Any) -> None:
        try:
            getattr(self.session, name)(*args)
        except BaseException as exc:  # SystemExit too: it ends this connection only
            if is_signal_interrupt(exc):
                raise
            service_log.exception(
                "stream service %s raised in %s on %s from %s; closing that connection",
                self.rt.service.name,
                name,
                self.rt.endpoint,
                fmt_peer(self.ctx.peer),
                extra={"event": "handler_error", "endpoint": self.rt.endpoint},
            )
            if name != "on_close":
                self.abort()


def set_linger_zero(transport: asyncio.BaseTransport | None) -> None:
    """Make the next close of ``transport``'s socket send RST (SO_LINGER on, 0 s)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    # Already closed, or not a socket (a pipe): an abort is all there is.
    with contextlib.suppress(OSError, AttributeError, NotImplementedError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


#: What a stream runtime builds for an accepted connection (a PROXY header first: proxywrap).
AnyConn = StreamProtocol | SessionProtocol

__all__ = [
    "AnyConn",
    "SessionProtocol",
    "StreamProtocol",
    "TransportConn",
    "conn_log",
    "set_linger_zero",
]
