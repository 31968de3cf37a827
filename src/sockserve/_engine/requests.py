"""Request handling shared by both stream engines (asyncio transports and epoll).

An async handler's requests on one connection are answered in order by one task
per connection; reading pauses while too many wait, so pipelining is bounded.
Handler failures are logged here, once, with the service, endpoint and peer. Any
exception a handler raises is its failure, ``SystemExit`` (argparse in a handler) and
``BaseException`` included: it ends that request and connection, never the server.
Only a real Ctrl-C passes through (see :func:`.signals.is_signal_interrupt`).

How a handler is called (:class:`HandlerCalls`, one per handler and server): a ``def``
handler inline on the loop, timed, until one call holds the loop past
:data:`BLOCKING_AFTER`; from then on (or from the start when marked blocking) in the
server's threads, its requests still answered in order per connection. An ``async def``
on the loop, its first step started at once where asyncio can (3.12+).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from ..config import ServerConfig
from ..errors import ProtocolError
from ..logs import fmt_peer, service_log
from ..service import Context, handler_mode, is_async_handler
from .contracts import CloseReason, ConnOwner, HandlerPool, Poller, QueueHost
from .signals import descheduled, is_signal_interrupt

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


#: A ``def`` handler call that holds the loop longer than this moves it to the threads: every
#: other client waited that long (100x a loopback request), well above what handlers that
#: compute rather than wait take (a lookup, a few KB of JSON: < 1 ms) and most GC pauses.
BLOCKING_AFTER = 0.025
#: Timed calls a handler suspected in a shared slow poll makes in Python before it is trusted.
PROBE_CALLS = 32


class HandlerCalls:
    """How one handler is called on one server: inline (watched, or marked nonblocking),
    in the threads (seen to block, or marked blocking), or as a coroutine."""

    def __init__(self, handler: Any, name: str, mode: bool | None, pool: HandlerPool) -> None:
        self.handler = handler
        self.name = name
        self._pool = pool
        self.is_async = is_async_handler(handler)
        sync = not self.is_async
        self.inline = sync and mode is not True
        self.auto = sync and mode is None
        #: The fast path (C or its twin) may call it: inline and not under suspicion.
        self.fast_ok = self.inline
        self.probing = 0
        self._hubs: list[Poller] = []
        descheduled()  # this thread's (the loop's) baseline

    @classmethod
    def of(cls, pool: HandlerPool, handler: Any, name: str, config: ServerConfig) -> HandlerCalls:
        """The server's one HandlerCalls for ``handler`` under this service's settings."""
        mode = True if config.blocking else False if config.nonblocking else handler_mode(handler)
        key = (id(handler), mode)
        calls = pool.calls.get(key)
        if calls is None or calls.handler is not handler:
            calls = pool.calls[key] = cls(handler, name, mode, pool)
        return cast(HandlerCalls, calls)

    def watch(self, hub: Poller) -> None:
        """``hub`` may call this handler on its fast path: tell it when that must stop."""
        if hub not in self._hubs:
            self._hubs.append(hub)

    def took(self, started: float) -> None:
        elapsed = time.perf_counter() - started
        if elapsed > BLOCKING_AFTER and (elapsed := elapsed - descheduled()) > BLOCKING_AFTER:
            self.seen_blocking(elapsed)
        elif self.probing:
            self.probing -= 1
            if not self.probing and self.inline:
                self.fast_ok = True
                for hub in self._hubs:
                    hub.rescan()

    def suspect(self) -> None:
        """A poll that called this handler and others on the fast path blocked the loop:
        time its next calls in Python, where each is timed alone."""
        if self.auto and not self.probing:
            self.probing = PROBE_CALLS
            self.fast_ok = False
            for hub in self._hubs:
                hub.refresh_fast()

    def seen_blocking(self, elapsed: float) -> None:
        """A call held the loop ``elapsed`` s: run this handler in the threads from now on."""
        if not self.auto:
            return
        self.auto = self.inline = self.fast_ok = False
        self.probing = 0
        service_log.warning(
            "handler %s blocked the event loop for %.0f ms; it runs in the handler threads "
            "(%d at most, --handler-threads) from now on (mark it sockserve.blocking, or serve "
            "--blocking, to start there; sockserve.nonblocking or --nonblocking keeps it inline)",
            self.name,
            elapsed * 1000,
            self._pool.size,
            extra={"event": "handler_blocking", "handler": self.name},
        )
        for hub in self._hubs:
            hub.refresh_fast()

    def call(self, loop: asyncio.AbstractEventLoop, msg: bytes, ctx: Context) -> Awaitable[Any]:
        """The reply to ``msg`` of a handler that does not run inline: its coroutine, or
        a future of ``loop`` computed in a thread."""
        if self.is_async:
            return cast(Awaitable[Any], self.handler(msg, ctx))
        return cast(Awaitable[Any], self._pool.run(loop, self.handler, msg, ctx))


if sys.version_info >= (3, 12):

    def _task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> Any:
        # Eager: the first step runs inside this call, in the task (current_task() is it).
        return asyncio.Task(coro, loop=loop, eager_start=True)

else:  # no eager start before 3.12; running the first step by hand would leave it outside
    # any task (asyncio.timeout and anyio's cancel scopes need one), so it is not done.

    def _task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> Any:
        return loop.create_task(coro)


def start_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], hub: Poller | None
) -> asyncio.Task[None] | None:
    """Run ``coro`` as a task, started at once where asyncio can (a handler that does not
    suspend is then answered inside this call: no task queued, no loop turn): the task,
    or None when it is done already. ``hub`` counts it as pending while it runs."""
    task: asyncio.Task[None] = _task(loop, coro)
    if task.done():
        return None
    if hub is not None:
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
        "_ctx",
        "_handler",
        "_host",
        "_hub",
        "_owner",
        "_queue",
        "_starting",
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
            self._starting = True
            try:
                self._worker = start_task(self._owner.loop, self._run_queue(), self._hub)
            finally:
                self._starting = False
        if len(self._queue) >= MAX_QUEUED:
            self.pause(PAUSE_QUEUE)

    async def _run_queue(self) -> None:
        queue = self._queue
        assert queue is not None
        host = self._host
        calls, loop = self._calls, self._owner.loop
        try:
            while queue:
                msg = queue.popleft()
                if self.paused & PAUSE_QUEUE and len(queue) <= RESUME_QUEUED:
                    self.resume(PAUSE_QUEUE)
                try:
                    reply = await calls.call(loop, msg, self._ctx)
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
        if self._starting:
            return  # answered in an eager first step: the dispatching caller goes on
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
