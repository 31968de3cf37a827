"""The fast engine: plain TCP/Unix stream connections and datagram sockets on one epoll set.

Why not asyncio transports for these: every connection readiness then costs a
trip through the event loop and a ``data_received`` call; here one loop
callback drains a whole batch of ready sockets with direct ``recv``/``send``
calls, and keeps polling (non-blocking) for a few tens of microseconds after
a batch before going back to sleep. A closed-loop client usually sends its
next request within that window, so the server skips a sleep and a wake-up per
request: that is where most of a request's latency goes on loopback and VMs.

With the C helper (``sockserve._engine.fastio``), the poll itself runs in C and answers
plain raw requests there (``Hub.fast``): whatever it cannot finish comes back as
an event for the same Python methods that serve it without the helper.

The epoll set is itself a file descriptor, registered with the event loop
(uvloop or asyncio) through ``add_reader``, so timers, async handlers, TLS
connections and signals keep working around it. Connections it cannot serve
(TLS, streaming services, PROXY protocol) stay on asyncio transports.

Error handling: OS errors on one socket close that connection, logged with its
reason. Resource handling: reading stops while unsent replies exceed the
high-water mark or async requests queue up, exactly like the transport path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ProtocolError
from ..framing import Codec, make_codec
from ..logs import server_log
from ..service import Context
from .fastio import PollResult, poll_fast, stream_recv, stream_send
from .requests import PAUSE_WRITE, RequestQueue
from .signals import is_signal_interrupt

if TYPE_CHECKING:
    from .runtime import StreamRuntime

HAVE_EPOLL = hasattr(select, "epoll")

_IN = getattr(select, "EPOLLIN", 1)
_OUT = getattr(select, "EPOLLOUT", 4)
_ERR = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)
_IN_OR_ERR = _IN | _ERR

#: Bytes read per recv: a whole 64 KiB message in one call, like uvloop's read size.
READ_SIZE = 65536
#: Events taken per epoll_wait.
MAX_EVENTS = 1024
#: Busy-poll only after batches of at most this many events, and only while at most
#: SPIN_MEMBERS sockets are registered: few clients, where the sleep and wake-up between
#: requests dominate their latency. With many clients the next request is on its way
#: anyway and empty polls only cost (7% at 50 connections, measured).
SPIN_BATCH = 4
SPIN_MEMBERS = 8
#: Longest one loop callback keeps serving before yielding to timers, tasks and accepts.
MAX_TURN = 0.002


class Member(Protocol):
    """Something registered with the hub: called with the epoll event bits.

    A member may also offer ``fast_spec()`` and ``on_fast_result(extra)``: see
    FastStream, whose plain requests the C helper answers without calling it.
    """

    def on_event(self, events: int) -> None: ...


class Hub:
    """One epoll set per server, drained from a single event-loop reader callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, busy_poll: float) -> None:
        self.loop = loop
        self.busy_poll = busy_poll
        self._ep = select.epoll()
        self.members: dict[int, Member] = {}
        #: fd -> (member, handler, ctx, max_message) of connections whose next readable
        #: event the C helper may serve itself: raw framing, a sync handler, only
        #: reading (nothing queued to send, not paused or closing).
        self.fast: dict[int, tuple[Any, Any, Any, int]] = {}
        self._poll = self._poll_python if poll_fast is None else self._poll_c
        loop.add_reader(self._ep.fileno(), self._ready)
        self._closed = False

    def add(self, fd: int, member: Member, events: int) -> None:
        self._ep.register(fd, events)
        self.members[fd] = member
        self._note_fast(fd, member, events)

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)
        member = self.members.get(fd)
        if member is not None:
            self._note_fast(fd, member, events)

    def _note_fast(self, fd: int, member: Member, events: int) -> None:
        spec_of = getattr(member, "fast_spec", None)
        spec = spec_of() if spec_of is not None and events == _IN else None
        if spec is not None:
            self.fast[fd] = spec
        else:
            self.fast.pop(fd, None)

    def remove(self, fd: int) -> None:
        self.fast.pop(fd, None)
        if self.members.pop(fd, None) is not None and not self._closed:
            # OSError/ValueError: already closed, and the kernel dropped it from the set.
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self._ep.fileno())
            self._ep.close()

    def _member_failed(self, fd: int, member: Member) -> None:
        """A bug or resource failure inside one member: log it, end that member only."""
        server_log.exception(
            "internal error serving descriptor %d (%s); closing it",
            fd,
            type(member).__name__,
            extra={"event": "internal_error"},
        )
        abort = getattr(member, "abort", None)
        if abort is not None:
            abort()
        else:
            self.remove(fd)

    def _stopped_by(self, error: BaseException) -> None:
        """Raise what stopped a batch, unless it is a handler's own KeyboardInterrupt.

        The C helper stops a batch with a handler's KeyboardInterrupt only when that
        handler's code closed its own connection (there is none left to hand it to).
        """
        if isinstance(error, KeyboardInterrupt) and not is_signal_interrupt(error):
            server_log.error(
                "a handler raised KeyboardInterrupt after closing its connection",
                exc_info=error,
                extra={"event": "handler_error"},
            )
            return
        raise error

    def _poll_c(self) -> PollResult:
        assert poll_fast is not None
        return poll_fast(self._ep.fileno(), MAX_EVENTS, self.fast)

    def _poll_python(self) -> PollResult:
        events = self._ep.poll(0, MAX_EVENTS)
        return len(events), [(fd, ev, None) for fd, ev in events], None

    def _ready(self) -> None:
        poll = self._poll
        members = self.members
        clock = time.perf_counter
        spin = self.busy_poll
        end_turn = 0.0
        idle_until = 0.0
        while True:
            count, events, error = poll()
            if count:
                # Events the C helper served itself are not in the list (see fast).
                for fd, ev, extra in events:
                    member = members.get(fd)
                    if member is not None:
                        try:
                            if extra is None:
                                member.on_event(ev)
                            else:
                                member.on_fast_result(extra)  # type: ignore[attr-defined]
                        except Exception:
                            self._member_failed(fd, member)
                        except BaseException as exc:  # a real Ctrl-C: after the batch
                            error = exc if error is None else error
                if error is not None:
                    self._stopped_by(
                        error
                    )  # what stopped the C batch, once its results are handled
                # Poll again straight away rather than through the loop: while batches keep
                # coming that saves the loop's own epoll_wait and dispatch per batch. Spin
                # (keep polling through empty polls) only with few clients (see SPIN_BATCH).
                now = clock()
                if not end_turn:
                    end_turn = now + MAX_TURN
                elif now > end_turn:
                    return  # let the loop run timers, tasks and accepts; level-triggered, so we come back
                few = count <= SPIN_BATCH and len(members) <= SPIN_MEMBERS
                idle_until = now + spin if spin and few else 0.0
            elif not idle_until or clock() > idle_until:
                return


class FastStream(RequestQueue):
    """One request/reply stream connection served straight from the hub.

    Offers what the runtime's bookkeeping needs, like the transport-based
    ``StreamProtocol``: ``ctx``, ``active``/``idle_since``/``busy`` for the idle
    sweeper, ``close``/``drain``/``abort``.
    """

    __slots__ = (
        "_async",
        "_codec",
        "_eof",
        "_events",
        "_fast",
        "_handler",
        "_high",
        "_low",
        "_max",
        "_out",
        "_out_size",
        "_paused",
        "_queue",
        "_worker",
        "active",
        "closing",
        "ctx",
        "fd",
        "hub",
        "idle_since",
        "rt",
        "sock",
    )

    def __init__(self, rt: StreamRuntime, hub: Hub, sock: socket.socket, peer: Any) -> None:
        cfg = rt.config
        self.rt = rt
        self.hub = hub
        self.sock = sock
        self.fd = sock.fileno()
        self.ctx = Context(peer, rt.endpoint)
        self._handler = rt.handler
        self._async = rt.is_async
        self._max = cfg.max_message
        # raw framing with a sync handler: each chunk answered inline, no codec (made lazily).
        self._fast = cfg.framing == "raw" and not rt.is_async
        self._codec: Codec | None = None if self._fast else make_codec(cfg.framing, cfg.max_message)
        self._high = cfg.write_high_water
        self._low = cfg.write_low_water
        self._out: list[bytes] | None = None
        self._out_size = 0
        self._queue: deque[bytes] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._paused = 0
        self._eof = False
        self._events = _IN
        self.closing = False
        self.active = True
        self.idle_since = 0.0
        hub.add(self.fd, self, _IN)
        rt.opened(self)

    # -- events ------------------------------------------------------------------------

    def fast_spec(self) -> tuple[FastStream, Any, Context, int] | None:
        """What the C helper needs to answer this connection's plain requests itself."""
        return (self, self._handler, self.ctx, self._max) if self._fast else None

    def on_fast_result(self, extra: object) -> None:
        """Finish what the C helper began for a readable event (see ``poll_fast``)."""
        if type(extra) is bytes:
            self._received(extra)  # end of stream, or longer than one request
        elif type(extra) is int:
            self._finish(OSError(extra, os.strerror(extra)))
        elif type(extra) is tuple:
            reply, sent = extra
            if type(reply) is not bytes:
                self._send(reply)
            elif sent < 0 and -sent not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self._finish(OSError(-sent, os.strerror(-sent)))
            else:
                self._hold(reply[max(sent, 0) :])
        elif isinstance(extra, BaseException):  # the handler raised it (SystemExit too)
            if is_signal_interrupt(extra):
                raise extra
            try:
                raise extra
            except BaseException:
                self._handler_failed()

    def on_event(self, events: int) -> None:
        if self._events == _IN and events & _IN:
            # The hot path, inlined: reading, nothing queued to send.
            try:
                data = stream_recv(self.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._finish(exc)
                return
            if data and self._fast and len(data) <= self._max:
                self.active = True  # a whole request (framed input counts only when complete)
                try:
                    reply = self._handler(data, self.ctx)
                except BaseException as exc:  # SystemExit too: it ends this connection only
                    if is_signal_interrupt(exc):
                        raise
                    self._handler_failed()
                    return
                if type(reply) is not bytes:
                    if reply is not None:
                        self._send(reply)
                    return
                try:
                    sent = stream_send(self.fd, reply)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    self._finish(exc)
                    return
                if sent != len(reply):
                    self._hold(reply[sent:])
                return
            self._received(data)
            return
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
        if self._fast and len(data) <= self._max:
            self.active = True  # a whole request (framed input counts only when complete)
            try:
                reply = self._handler(data, self.ctx)
            except BaseException as exc:  # SystemExit too: it ends this connection only
                if is_signal_interrupt(exc):
                    raise
                self._handler_failed()
                return
            if type(reply) is bytes:
                self._write(reply)
            elif reply is not None:
                self._send(reply)
            return
        codec = self._get_codec()
        try:
            codec.feed(data)
            self._drain_codec()
        except ProtocolError as exc:
            self._protocol_error(exc)

    def _get_codec(self) -> Codec:
        if self._codec is None:
            self._codec = make_codec(self.rt.config.framing, self._max)
        return self._codec

    def _on_eof(self) -> None:
        self._eof = True
        self._set_reading(False)
        codec = self._codec  # None: raw fast path, nothing buffered, nothing left to answer
        if codec is not None:
            try:
                while not self.closing and (msg := codec.next_message()) is not None:
                    self._dispatch(msg)
                last = codec.end_of_input()
            except ProtocolError as exc:
                self._protocol_error(exc)
                return
            if last is not None and not self.closing:
                self._dispatch(last)
        if not self.busy:
            self.close()  # flush what is written, then close

    # -- requests ----------------------------------------------------------------------

    def _send(self, reply: object) -> None:
        if reply is None or self.fd < 0:
            return
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            self._bad_reply(reply)
            return
        codec = self._codec
        self._write(codec.encode(bytes(reply)) if codec is not None else bytes(reply))

    # -- writing and flow control ------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._out:
            self._out.append(data)
            self._out_size += len(data)
            if self._out_size > self._high:
                self._pause(PAUSE_WRITE)
            return
        try:
            sent = stream_send(self.fd, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._finish(exc)
            return
        if sent < len(data):
            self._hold(data[sent:])

    def _hold(self, rest: bytes) -> None:
        """Keep what the kernel did not take; send it when the socket is writable."""
        self._out = [rest]
        self._out_size = len(rest)
        self._update_events()
        if self._out_size > self._high:
            self._pause(PAUSE_WRITE)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = stream_send(self.fd, data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._finish(exc)
            return
        if sent < len(data):
            self._out = [data[sent:]]
            self._out_size = len(data) - sent
        else:
            self._out = None
            self._out_size = 0
        if self._out_size <= self._low and self._paused & PAUSE_WRITE:
            self._resume(PAUSE_WRITE)
        if not self._out:
            if self.closing and not self.busy:
                self._finish(None)
                return
            self._update_events()

    def _pause(self, why: int) -> None:
        self._paused |= why
        self._set_reading(False)

    def _can_resume(self) -> bool:
        return not self.closing and self.fd >= 0

    def _start_reading(self) -> None:
        if not self._eof:
            self._set_reading(True)

    def _codec_now(self) -> Codec:
        return self._get_codec()

    def _set_reading(self, on: bool) -> None:
        want = (_IN if on else 0) | (self._events & _OUT)
        if want != self._events and self.fd >= 0:
            self._events = want
            self.hub.modify(self.fd, want)

    def _update_events(self) -> None:
        want = (self._events & _IN) | (_OUT if self._out else 0)
        if want != self._events and self.fd >= 0:
            self._events = want
            self.hub.modify(self.fd, want)

    @property
    def write_buffer_size(self) -> int:
        """Reply bytes accepted but not yet taken by the kernel."""
        return self._out_size

    @property
    def paused(self) -> bool:
        return bool(self._paused)

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet a whole request."""
        return self._codec.buffered if self._codec is not None else 0

    @property
    def queued(self) -> int:
        """Requests waiting for the async handler."""
        return len(self._queue) if self._queue is not None else 0

    # -- failures and closing ----------------------------------------------------------

    def close(self) -> None:
        """Stop reading; close once the replies already written are flushed."""
        self.closing = True
        if self.fd < 0:
            return
        if not self._out:
            self._finish(None)
        else:
            self._set_reading(False)

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
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        self.rt.closed(self, exc)
