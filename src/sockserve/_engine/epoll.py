"""The fast engine: plain TCP/Unix stream connections and datagram sockets on one epoll set.

Why not asyncio transports for these: every connection readiness then costs a
trip through the event loop and a ``data_received`` call; here one loop
callback drains a whole batch of ready sockets with direct ``recv``/``send``
calls, and keeps polling (non-blocking) for a few tens of microseconds after
a batch before going back to sleep. A closed-loop client usually sends its
next request within that window, so the server skips a sleep and a wake-up per
request: that is where most of a request's latency goes on loopback and VMs.

The poll answers plain raw requests itself (``Hub.fast``): in C with the helper,
else in its pure-Python twin (``fastpath.poll_fast``). Whatever it cannot finish
comes back as a tagged outcome (the contract in ``fastio``) for the member.
``HandlerCalls`` lives here, beside the hub it steers: how one handler is called
(inline, in the threads, or as a coroutine), and when its connections leave the fast path.

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
import select
import time
from collections.abc import Awaitable
from typing import Any, Protocol, cast

from ..config import ServerConfig
from ..logs import server_log, service_log
from ..service import Context, handler_mode, is_async_handler
from .contracts import HandlerPool, Poller
from .fastio import EVENT, PollResult, c_poll_fast
from .fastpath import poll_fast
from .signals import descheduled

HAVE_EPOLL = hasattr(select, "epoll")

_IN = getattr(select, "EPOLLIN", 1)
_OUT = getattr(select, "EPOLLOUT", 4)
_ERR = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)
_IN_OR_ERR = _IN | _ERR
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
#: What a request of a handler that does not block may take within a slow poll: a poll
#: that served 1,000 requests of 30 us is slow for being many, no handler blocked in it.
FAST_CALL = 0.0005


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


class Member(Protocol):
    """Something registered with the hub: called with the epoll event bits.

    A member may also offer ``fast_spec()`` and ``on_fast_result(tag, value)``: see
    FastStream, whose plain requests the fast path answers without calling it.
    """

    def on_event(self, events: int) -> None: ...


class Hub:
    """One epoll set per server, drained from a single event-loop reader callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, busy_poll: float) -> None:
        self.loop = loop
        self.busy_poll = busy_poll
        self._ep = select.epoll()
        self.members: dict[int, Member] = {}
        #: fd -> (member, handler, ctx, max_message, kind) of connections whose next
        #: readable event the fast path (C, or its twin in fastpath.py) may serve itself:
        #: a sync handler, only reading (nothing queued, not paused or closing), no
        #: partial request buffered (see FastStream.fast_spec).
        self.fast: dict[int, tuple[Any, Any, Any, int, int]] = {}
        self._events: dict[int, int] = {}
        #: Tasks its members started (async handlers, thread jobs awaited) still running:
        #: meanwhile it does not busy-poll (the reply it would wait for is theirs, written
        #: only once it returns to the loop).
        self.pending = 0
        self._poll = self._poll_python if c_poll_fast is None else self._poll_c
        loop.add_reader(self._ep.fileno(), self._ready)
        self._closed = False

    def add(self, fd: int, member: Member, events: int) -> None:
        self._ep.register(fd, events)
        self.members[fd] = member
        self._events[fd] = events
        self._note_fast(fd, member, events)

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)
        member = self.members.get(fd)
        if member is not None:
            self._events[fd] = events
            self._note_fast(fd, member, events)

    def task_done(self, task: asyncio.Task[None]) -> None:
        """A pending task ended. With the last one the replies waited for are written:
        poll for the next requests now, busy-polling with few clients as after a batch
        the hub answered itself (the spin it skipped while the tasks ran)."""
        self.pending -= 1
        few = len(self.members) <= SPIN_MEMBERS
        if not self.pending and self.busy_poll and few and not self._closed:
            self._ready(spin_first=True)

    def refresh_fast(self) -> None:
        """A handler may no longer run on the fast path: ask each fast member again."""
        for fd, spec in list(self.fast.items()):
            if spec[0].fast_spec() is None:
                del self.fast[fd]

    def rescan(self) -> None:
        """A handler may run on the fast path again: ask every member that is not on it."""
        for fd, member in list(self.members.items()):
            if fd not in self.fast:
                self._note_fast(fd, member, self._events.get(fd, 0))

    def _slow_poll(self, elapsed: float, count: int) -> None:
        """One poll of ``count`` events held the loop ``elapsed`` s: a handler the fast
        path called blocked. With one watched handler on it, that one; with several, each
        is timed alone next. Not when the machine ran others meanwhile (the time this
        thread waited for a CPU), nor when the poll was long for the requests it served."""
        elapsed -= descheduled() + count * FAST_CALL
        if elapsed <= BLOCKING_AFTER:
            return
        suspects = {
            calls
            for spec in self.fast.values()
            if (calls := getattr(spec[0], "calls", None)) is not None and calls.auto
        }
        if len(suspects) == 1:
            suspects.pop().seen_blocking(elapsed)
        for calls in suspects:
            calls.suspect()

    def _note_fast(self, fd: int, member: Member, events: int) -> None:
        spec_of = getattr(member, "fast_spec", None)
        spec = spec_of() if spec_of is not None and events == _IN else None
        if spec is not None:
            self.fast[fd] = spec
        else:
            self.fast.pop(fd, None)

    def set_fast(self, fd: int, spec: tuple[Any, Any, Any, int, int] | None) -> None:
        """A member's own word that it may (a spec) or may not (None) be served fast now."""
        if spec is not None:
            self.fast[fd] = spec
        else:
            self.fast.pop(fd, None)

    def remove(self, fd: int) -> None:
        self.fast.pop(fd, None)
        self._events.pop(fd, None)
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

    def _poll_c(self) -> PollResult:
        assert c_poll_fast is not None
        return c_poll_fast(self._ep.fileno(), MAX_EVENTS, self.fast)

    def _poll_python(self) -> PollResult:
        return poll_fast(self._ep, MAX_EVENTS, self.fast)

    def _ready(self, spin_first: bool = False) -> None:
        poll = self._poll
        members = self.members
        clock = time.perf_counter
        spin = self.busy_poll
        end_turn = 0.0
        started = clock()
        idle_until = started + spin if spin_first else 0.0
        while True:
            count, items, error = poll()
            if count:
                if clock() - started > BLOCKING_AFTER and self.fast:
                    self._slow_poll(clock() - started, count)
                # Requests the fast path answered in full are not in the list (see fast).
                for fd, tag, value, owner in items:
                    member = owner if owner is not None else members.get(fd)
                    if member is not None:
                        try:
                            if tag == EVENT:
                                member.on_event(value)
                            else:
                                member.on_fast_result(tag, value)  # type: ignore[union-attr]
                        except Exception:
                            self._member_failed(fd, member)
                        except BaseException as exc:  # a real Ctrl-C: after the batch
                            error = exc if error is None else error
                if error is not None:
                    raise error  # what stopped the batch, once its results are handled
                # Poll again straight away rather than through the loop: while batches keep
                # coming that saves the loop's own epoll_wait and dispatch per batch. Spin
                # (keep polling through empty polls) only with few clients (see SPIN_BATCH).
                now = clock()
                if not end_turn:
                    end_turn = now + MAX_TURN
                elif now > end_turn:
                    return  # let the loop run timers, tasks and accepts; level-triggered, so we come back
                # No spin while its tasks run: the replies waited for are theirs, written
                # once it returns to the loop (task_done spins when the last one ends).
                few = count <= SPIN_BATCH and len(members) <= SPIN_MEMBERS
                idle_until = now + spin if spin and few and not self.pending else 0.0
                started = clock()
            elif not idle_until or (started := clock()) > idle_until:
                return
