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
from .contracts import CloseReason, ConnOwner, QueueHost
from .signals import is_signal_interrupt

if TYPE_CHECKING:
    from ..framing import Codec

#: Requests queued for an async handler before reading pauses (pipelining bound).
MAX_QUEUED = 64
RESUME_QUEUED = 16

# Reasons reading is paused, as bits, so one cause clearing does not resume another.
PAUSE_WRITE = 1
PAUSE_QUEUE = 2
#: Draining: nothing more is read; what was read is answered, then the connection closes.
PAUSE_DRAIN = 4


class RequestQueue:
    """One connection's requests: dispatching, in-order answering of async ones, pausing,
    draining, handler failures.

    Composed into both stream engines' connections (``StreamProtocol`` on asyncio
    transports, ``FastStream`` on the epoll hub): it drives its host through
    :class:`~.contracts.QueueHost` (write a reply, stop/start reading, close) and reports
    to the connection's owner (:class:`~.contracts.ConnOwner`) why it closed.
    """

    __slots__ = ("_ctx", "_handler", "_host", "_is_async", "_owner", "_queue", "_worker", "paused")

    def __init__(self, host: QueueHost, owner: ConnOwner, ctx: Context) -> None:
        self._host = host
        self._owner = owner
        self._ctx = ctx
        self._handler = owner.handler
        self._is_async = owner.is_async
        self._queue: deque[bytes] | None = None
        self._worker: asyncio.Task[None] | None = None
        #: Why reading is paused: PAUSE_* bits.
        self.paused = 0

    @property
    def busy(self) -> bool:
        """A request is queued or running: draining must wait for it."""
        return bool(self._queue) or self._worker is not None

    @property
    def queued(self) -> int:
        """Requests waiting for the async handler."""
        return len(self._queue) if self._queue is not None else 0

    def cancel(self) -> None:
        """The connection is gone: stop the async handler's task."""
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def dispatch(self, msg: bytes) -> None:
        """Answer one whole request: inline for a sync handler, queued for an async one."""
        host = self._host
        host.active = True
        if self._is_async:
            self._enqueue(msg)
            return
        try:
            reply = self._handler(msg, self._ctx)
        except BaseException as exc:  # SystemExit too: it ends this request, not the server
            if is_signal_interrupt(exc):
                raise
            self.handler_failed()
            return
        host.send_reply(reply)

    def drain_codec(self) -> None:
        """Answer the whole requests the codec holds, stopping while reading is paused.

        One read can hold thousands of small requests; answering them all at once would
        grow the write buffer (or the async queue) far past its mark. The rest stay
        parsed-but-unanswered in the codec until ``resume``.
        """
        host = self._host
        codec = host.codec_now()
        while not host.closing and not self.paused & ~PAUSE_DRAIN:
            msg = codec.next_message()
            if msg is None:
                if self.paused & PAUSE_DRAIN and not self.busy:
                    host.close()  # draining, and every request read has been answered
                return
            self.dispatch(msg)

    def answer_rest(self, codec: Codec) -> bool:
        """At end of input: answer the whole requests the codec still holds (reading was
        paused), then its last, unterminated one. False: a protocol error (now closing)."""
        host = self._host
        try:
            while not host.closing and (msg := codec.next_message()) is not None:
                self.dispatch(msg)
            last = codec.end_of_input()
        except ProtocolError as exc:
            self.protocol_error(exc)
            return False
        if last is not None and not host.closing:
            self.dispatch(last)
        return True

    def pause(self, why: int) -> None:
        """Stop reading for one more reason."""
        if not self.paused:
            self._host.stop_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        """Clear one reason for pausing; with none left, answer what is buffered, then read."""
        host = self._host
        was = self.paused & ~PAUSE_DRAIN
        self.paused &= ~why
        if was and not self.paused & ~PAUSE_DRAIN and host.can_resume():
            if self.paused & PAUSE_DRAIN:  # draining: answer the rest, never read again
                if not self.busy:
                    self._drain_rest()
                return
            if host.buffered:
                try:
                    self.drain_codec()
                except ProtocolError as exc:
                    self.protocol_error(exc)
                    return
                if self.paused or host.closing:
                    return
            host.start_reading()

    def protocol_error(self, exc: ProtocolError) -> None:
        self._note(CloseReason.PROTOCOL, str(exc))
        if self._queue:
            self._queue.clear()
        self._host.close()

    def drain(self) -> None:
        """Graceful shutdown: read nothing more, answer every request already read (running,
        queued, or still whole in the codec's buffer: pipelined), then close."""
        host = self._host
        if host.closing or self.paused & PAUSE_DRAIN:
            return
        if not self.paused and not self.busy and not host.buffered:
            host.close()  # idle: nothing read is unanswered
            return
        self.pause(PAUSE_DRAIN)
        if self.paused & ~PAUSE_DRAIN or self.busy:
            return  # continued when the write buffer empties or the queue ends
        self._drain_rest()

    def _drain_rest(self) -> None:
        if not self._host.buffered:
            self._host.close()
            return
        try:
            self.drain_codec()
        except ProtocolError as exc:
            self.protocol_error(exc)

    def _enqueue(self, msg: bytes) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(msg)
        if self._worker is None:
            self._worker = self._owner.loop.create_task(self._run_queue())
        if len(self._queue) >= MAX_QUEUED:
            self.pause(PAUSE_QUEUE)

    async def _run_queue(self) -> None:
        queue = self._queue
        assert queue is not None
        host = self._host
        try:
            while queue:
                msg = queue.popleft()
                if self.paused & PAUSE_QUEUE and len(queue) <= RESUME_QUEUED:
                    self.resume(PAUSE_QUEUE)
                try:
                    reply = await cast(Awaitable[Any], self._handler(msg, self._ctx))
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # SystemExit too: it ends this request only
                    if is_signal_interrupt(exc):
                        raise
                    self.handler_failed()
                    return
                host.active = True
                host.send_reply(reply)
        finally:
            self._worker = None
        if host.eof or host.closing:
            host.close()
        elif self.paused == PAUSE_DRAIN:
            self._drain_rest()

    def handler_failed(self) -> None:
        """Log the handler's exception (call inside ``except``) and close this connection."""
        peer = fmt_peer(self._ctx.peer)
        owner = self._owner
        service_log.exception(
            "handler %s raised on %s from %s; closing that connection",
            owner.service.name,
            owner.endpoint,
            peer,
            extra={"event": "handler_error", "endpoint": owner.endpoint, "peer": peer},
        )
        self._note(CloseReason.HANDLER)
        self._host.abort()

    def bad_reply(self, reply: object) -> None:
        peer = fmt_peer(self._ctx.peer)
        owner = self._owner
        service_log.error(
            "handler %s returned %s, not bytes or None; closing connection from %s",
            owner.service.name,
            type(reply).__name__,
            peer,
            extra={"event": "handler_error", "endpoint": owner.endpoint, "peer": peer},
        )
        self._note(CloseReason.HANDLER)
        self._host.abort()

    def _note(self, reason: CloseReason, detail: str = "") -> None:
        self._owner.note_close_reason(self._host, reason, detail)


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
