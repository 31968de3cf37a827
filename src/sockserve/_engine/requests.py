"""Request handling shared by both stream engines (asyncio transports and epoll).

An async handler's requests on one connection are answered in order by one task
per connection; reading pauses while too many wait, so pipelining is bounded.
Handler failures are logged here, once, with the service, endpoint and peer. Any
exception a handler raises is its failure, ``SystemExit`` (argparse in a handler) and
``BaseException`` included: it ends that request and connection, never the server.
Only a real Ctrl-C passes through (see :func:`.signals.is_signal_interrupt`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

from ..errors import ProtocolError
from ..logs import fmt_peer, service_log
from ..service import Context
from .signals import is_signal_interrupt

if TYPE_CHECKING:
    from ..framing import Codec
    from .runtime import StreamRuntime

#: Requests queued for an async handler before reading pauses (pipelining bound).
MAX_QUEUED = 64
RESUME_QUEUED = 16

# Reasons reading is paused, as bits, so one cause clearing does not resume another.
PAUSE_WRITE = 1
PAUSE_QUEUE = 2
#: Draining: nothing more is read; what was read is answered, then the connection closes.
PAUSE_DRAIN = 4


class RequestQueue:
    """Mixin: dispatching requests, in-order answering of async ones, handler failures.

    The class using it provides ``rt``, ``ctx``, ``_handler``, ``_async``, ``_codec``,
    ``_queue``, ``_worker``, ``_paused``, ``_eof``, ``closing`` and the methods
    ``_send``, ``_pause``, ``close``, ``abort``, and the engine hooks ``_can_resume``
    (reading may restart), ``_start_reading`` and ``_codec_now`` (the codec, made if needed).
    """

    if not TYPE_CHECKING:  # slotted at run time (no per-connection __dict__); mypy sees the fields
        __slots__ = ()

    rt: StreamRuntime
    ctx: Context
    closing: bool
    _handler: Any
    _async: bool
    _queue: deque[bytes] | None
    _worker: asyncio.Task[None] | None
    _paused: int
    _codec: Codec | None
    _eof: bool

    active: bool

    if TYPE_CHECKING:

        def _send(self, reply: object) -> None: ...
        def _pause(self, why: int) -> None: ...
        def _can_resume(self) -> bool: ...
        def _start_reading(self) -> None: ...
        def _codec_now(self) -> Codec: ...
        def close(self) -> None: ...
        def abort(self) -> None: ...

    def _dispatch(self, msg: bytes) -> None:
        """Answer one whole request: inline for a sync handler, queued for an async one."""
        self.active = True
        if self._async:
            self._enqueue(msg)
            return
        try:
            reply = self._handler(msg, self.ctx)
        except BaseException as exc:  # SystemExit too: it ends this request, not the server
            if is_signal_interrupt(exc):
                raise
            self._handler_failed()
            return
        self._send(reply)

    def _drain_codec(self) -> None:
        """Answer the whole requests the codec holds, stopping while reading is paused.

        One read can hold thousands of small requests; answering them all at once would
        grow the write buffer (or the async queue) far past its mark. The rest stay
        parsed-but-unanswered in the codec until ``_resume``.
        """
        codec = self._codec_now()
        while not self.closing and not self._paused & ~PAUSE_DRAIN:
            msg = codec.next_message()
            if msg is None:
                if self._paused & PAUSE_DRAIN and not self.busy:
                    self.close()  # draining, and every request read has been answered
                return
            self._dispatch(msg)

    def _resume(self, why: int) -> None:
        """Clear one reason for pausing; with none left, answer what is buffered, then read."""
        was = self._paused & ~PAUSE_DRAIN
        self._paused &= ~why
        if was and not self._paused & ~PAUSE_DRAIN and self._can_resume():
            if self._paused & PAUSE_DRAIN:  # draining: answer the rest, never read again
                if not self.busy:
                    self._drain_rest()
                return
            codec = self._codec
            if codec is not None and codec.buffered:
                try:
                    self._drain_codec()
                except ProtocolError as exc:
                    self._protocol_error(exc)
                    return
                if self._paused or self.closing:
                    return
            self._start_reading()

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.rt.note_close_reason(self, f"protocol error: {exc}")  # type: ignore[arg-type]
        if self._queue:
            self._queue.clear()
        self.close()

    @property
    def busy(self) -> bool:
        """A request is queued or running: draining must wait for it."""
        return bool(self._queue) or self._worker is not None

    def drain(self) -> None:
        """Graceful shutdown: read nothing more, answer every request already read (running,
        queued, or still whole in the codec's buffer: pipelined), then close."""
        if self.closing or self._paused & PAUSE_DRAIN:
            return
        codec = self._codec
        if not self._paused and not self.busy and (codec is None or not codec.buffered):
            self.close()  # idle: nothing read is unanswered
            return
        self._pause(PAUSE_DRAIN)
        if self._paused & ~PAUSE_DRAIN or self.busy:
            return  # continued when the write buffer empties or the queue ends
        self._drain_rest()

    def _drain_rest(self) -> None:
        codec = self._codec
        if codec is None or not codec.buffered:
            self.close()
            return
        try:
            self._drain_codec()
        except ProtocolError as exc:
            self._protocol_error(exc)

    def _enqueue(self, msg: bytes) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(msg)
        if self._worker is None:
            self._worker = self.rt.loop.create_task(self._run_queue())
        if len(self._queue) >= MAX_QUEUED:
            self._pause(PAUSE_QUEUE)

    async def _run_queue(self) -> None:
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                msg = queue.popleft()
                if self._paused & PAUSE_QUEUE and len(queue) <= RESUME_QUEUED:
                    self._resume(PAUSE_QUEUE)
                try:
                    reply = await cast(Awaitable[Any], self._handler(msg, self.ctx))
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # SystemExit too: it ends this request only
                    if is_signal_interrupt(exc):
                        raise
                    self._handler_failed()
                    return
                self.active = True
                self._send(reply)
        finally:
            self._worker = None
        if self._eof or self.closing:
            self.close()
        elif self._paused == PAUSE_DRAIN:
            self._drain_rest()

    def _handler_failed(self) -> None:
        """Log the handler's exception (call inside ``except``) and close this connection."""
        peer = fmt_peer(self.ctx.peer)
        service_log.exception(
            "handler %s raised on %s from %s; closing that connection",
            self.rt.service.name,
            self.rt.endpoint,
            peer,
            extra={"event": "handler_error", "endpoint": self.rt.endpoint, "peer": peer},
        )
        self.rt.note_close_reason(self, "handler error")  # type: ignore[arg-type]
        self.abort()

    def _bad_reply(self, reply: object) -> None:
        peer = fmt_peer(self.ctx.peer)
        service_log.error(
            "handler %s returned %s, not bytes or None; closing connection from %s",
            self.rt.service.name,
            type(reply).__name__,
            peer,
            extra={"event": "handler_error", "endpoint": self.rt.endpoint, "peer": peer},
        )
        self.rt.note_close_reason(self, "handler error")  # type: ignore[arg-type]
        self.abort()
