"""Request handling shared by both stream engines (asyncio transports and epoll).

An async handler's requests on one connection are answered in order by one task
per connection; reading pauses while too many wait, so pipelining is bounded.
Handler failures are logged here, once, with the service, endpoint and peer. Any
exception a handler raises is its failure, ``SystemExit`` (argparse in a handler) and
``BaseException`` included: it ends that request and connection, never the server.
Only a real Ctrl-C passes through (see :func:`.signals.is_signal_interrupt`).

How a handler is called (:class:`.epoll.HandlerCalls`, one per handler and server): a ``def``
handler inline on the loop, timed, until one call holds the loop past
:data:`.epoll.BLOCKING_AFTER`; from then on (or from the start when marked blocking) in the
server's threads, its requests still answered in order per connection. An ``async def``
on the loop, in the connection's worker task, which lives as long as the connection: a
request that comes while it waits for work has its handler's first step run at once, as
a step of that task (``sockserve._tasks.first_step``, 3.11+), so a handler that does not suspend
is answered with no task made and no loop turn; one that suspends goes on in the task.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from .._tasks import DONE, INLINE_STEPS, NOT_RUN, RAISED, first_step, new_task, resume
from ..errors import ProtocolError
from ..logs import fmt_peer, service_log
from ..service import Context
from .contracts import CloseReason, ConnOwner, Poller, QueueHost
from .epoll import HandlerCalls
from .signals import is_signal_interrupt

__all__ = ["HandlerCalls", "RequestQueue", "start_task"]  # HandlerCalls: where it was

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
#: A protocol error with requests still running: nothing more is read, they are answered.
PAUSE_BROKEN = 8


def start_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], hub: Poller | None
) -> asyncio.Task[None] | None:
    """Run ``coro`` as a task, started at once where asyncio can (a handler that does not
    suspend is then answered inside this call: no task queued, no loop turn): the task,
    or None when it is done already. ``hub`` counts it as pending while it runs."""
    task = new_task(loop, coro)
    if task is not None and hub is not None:
        hub.pending += 1
        task.add_done_callback(hub.task_done)
    return task


class RequestQueue:
    """One connection's requests: dispatching, in-order answering of async ones, pausing,
    draining, handler failures.

    Composed into both stream engines' connections (``StreamProtocol`` on asyncio
    transports, ``FastStream`` on the epoll hub): it drives its host through
    :class:`~.contracts.QueueHost` (write a reply, stop/start reading, close) and reports
    to the connection's owner (:class:`~.contracts.ConnOwner`) why it closed.
    """

    __slots__ = (
        "_calls",
        "_context",
        "_ctx",
        "_handler",
        "_host",
        "_hub",
        "_owner",
        "_queue",
        "_running",
        "_starting",
        "_waiter",
        "_worker",
        "paused",
    )

    def __init__(
        self, host: QueueHost, owner: ConnOwner, ctx: Context, hub: Poller | None = None
    ) -> None:
        self._host = host
        self._owner = owner
        self._ctx = ctx
        self._handler = owner.handler
        self._calls = cast(HandlerCalls, owner.calls)
        #: The epoll hub this connection is served from (None: an asyncio transport).
        self._hub = hub
        self._starting = False  # its task is being started (eagerly: it may run now)
        #: Requests for the worker: bytes, or (coroutine, what it yielded) of a handler
        #: whose first step ran in _step_here.
        self._queue: deque[bytes | tuple[Any, Any]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._context: contextvars.Context | None = None  # the worker's
        self._waiter: asyncio.Future[None] | None = None  # set while the worker is idle
        self._running = False  # the worker has work (counted in the hub's pending)
        #: Why reading is paused: PAUSE_* bits.
        self.paused = 0

    @property
    def busy(self) -> bool:
        """A request is queued or running: draining must wait for it."""
        return bool(self._queue) or self._running

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
        calls = self._calls
        if not calls.inline:  # async, or blocking: in order, off the loop's own turn
            self._enqueue(msg)
            return
        started = time.perf_counter() if calls.auto else 0.0
        try:
            reply = self._handler(msg, self._ctx)
        except BaseException as exc:  # SystemExit too: it ends this request, not the server
            if started:
                calls.took(started)
            if is_signal_interrupt(exc):
                raise
            self.handler_failed()
            return
        if started:
            calls.took(started)
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
        if self.busy:  # whole requests read before the bad bytes are answered first
            self.pause(PAUSE_BROKEN)
            return
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
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        # The worker waits for work (and inline steps can run: 3.11+, _context set).
        idle = self._waiter is not None and self._worker is not None
        if idle and self._context is not None and not queue and self._calls.is_async:
            if self._step_here(msg):
                return
        else:
            queue.append(msg)
        self._wake()
        if len(queue) >= MAX_QUEUED:
            self.pause(PAUSE_QUEUE)

    def _step_here(self, msg: bytes) -> bool:
        """The worker is idle: run the handler's first step now, as its step. True: done
        (answered, or failed); False: it suspended (queued for the worker to go on)."""
        worker, context, queue = self._worker, self._context, self._queue
        assert worker is not None and context is not None and queue is not None
        loop = self._owner.loop
        tag, value = first_step(loop, worker, context, self._handler, (msg, self._ctx))
        if tag == DONE:
            self._host.active = True
            self._host.send_reply(value)
            return True
        if tag == RAISED:
            if is_signal_interrupt(value):
                raise value
            try:
                raise value
            except BaseException:
                self.handler_failed()
            return True
        queue.append(msg if tag == NOT_RUN else value)
        return False

    def _wake(self) -> None:
        """Give the worker what was queued: start it, or end its wait for work."""
        if self._running:
            return  # it takes what is queued before it waits again
        self._running = True
        if self._hub is not None:
            self._hub.pending += 1
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # else cancelled: the worker ends, and what it had
                waiter.set_result(None)
        elif self._worker is None:
            if self._context is None and INLINE_STEPS:
                self._context = contextvars.copy_context()
            self._starting = True
            try:
                self._worker = new_task(self._owner.loop, self._run_queue(), self._context)
            finally:
                self._starting = False

    def _idle(self, me: asyncio.Task[None] | None) -> None:
        """The worker has nothing left to do: the hub may busy-poll again."""
        if self._running:
            self._running = False
            hub = self._hub
            if hub is not None and me is not None:
                self._owner.loop.call_soon(hub.task_done, me)

    async def _run_queue(self) -> None:
        """The worker: the requests queued, in order; then it waits for more, as long
        as the connection lives (ended by ``cancel``)."""
        queue = self._queue
        assert queue is not None
        host = self._host
        calls, loop = self._calls, self._owner.loop
        me = asyncio.current_task(loop)
        try:
            while True:
                while queue:
                    item = queue.popleft()
                    if self.paused & PAUSE_QUEUE and len(queue) <= RESUME_QUEUED:
                        self.resume(PAUSE_QUEUE)
                    try:
                        if type(item) is tuple:
                            reply = await resume(*item)  # its first step ran in _step_here
                        else:
                            reply = await calls.call(loop, cast(bytes, item), self._ctx)
                    except asyncio.CancelledError:
                        raise
                    except BaseException as exc:  # SystemExit too: it ends this request only
                        if is_signal_interrupt(exc):
                            raise
                        self.handler_failed()
                        return
                    host.active = True
                    host.send_reply(reply)
                # Not when answered in an eager first step: the dispatching caller goes on.
                if not self._starting:
                    if host.eof or host.closing or self.paused & PAUSE_BROKEN:
                        host.close()
                        return
                    if self.paused == PAUSE_DRAIN:
                        self._drain_rest()
                        if queue:
                            continue
                self._idle(me)
                waiter = self._waiter = loop.create_future()
                try:
                    await waiter
                except asyncio.CancelledError as exc:
                    if queue and type(queue[0]) is tuple:
                        await self._cancel_started(exc)
                    raise
        finally:
            self._waiter = None
            self._worker = None
            self._idle(me)

    async def _cancel_started(self, exc: asyncio.CancelledError) -> None:
        """Cancelled before going on with a handler whose first step ran: that handler
        gets the cancellation, as it would have in its own task."""
        assert self._queue is not None
        coro, yielded = cast("tuple[Any, Any]", self._queue.popleft())
        if isinstance(yielded, asyncio.Future):
            yielded.cancel()
        try:
            await resume(coro, yielded, exc)
        except BaseException as failed:  # its end: the worker is cancelled anyway
            if is_signal_interrupt(failed):
                raise

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
