"""The request/reply fast path, written once in Python beside its C twin.

``poll_fast`` is the pure-Python twin of the C helper's ``poll_fast`` (the hub runs
it without the helper); ``answer`` is its raw middle (one whole request: mark the
connection active, call the handler, say how it ended), which the other paths that
already hold the bytes (``FastStream._received``, ``StreamProtocol.data_received``)
call too; ``serve_framed`` is its line and length framing (the twin of
``_speedups_c/framed.c``). All return the tagged outcomes of the contract written in
the docstring of :mod:`.fastio`; ``handler_raised`` is how every path ends a RAISED one.

A spec names its framing kind, so what comes next is a new kind served by this one
routine and its C twin, not a new copy of it.

``first_step`` is the async handlers' fast path: an ``async def`` handler's first step
run where the request was read, as a step of its connection's idle worker task (see
``RequestQueue``), so a handler that does not suspend is answered with no task made and
no loop turn; one that suspends goes on in that task (``resume``).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import select
import sys
import types
from collections.abc import Coroutine, Generator
from typing import Any, Protocol

from .fastio import (
    DATA,
    DONE,
    EOF,
    ERRNO,
    EVENT,
    KIND_LENGTH,
    KIND_LINE,
    KIND_RAW,
    MAX_EVENTS,
    MAX_SIZE,
    PARTIAL,
    RAISED,
    REPLY,
    PollResult,
    int_arg,
)
from .signals import is_signal_interrupt

_IN = getattr(select, "EPOLLIN", 1)
#: Gathered framed replies are sent once they reach this (framed.c's FLUSH_AT).
FLUSH_AT = MAX_SIZE
#: Largest body a 4-byte length prefix can express.
MAX_FRAME = 2**32 - 1

Outcome = tuple[int, Any]
_DONE: Outcome = (DONE, None)


class Answering(Protocol):
    """What a connection offers the fast path: the idle sweeper's flag, and how it
    logs its handler's failure (inside ``except``) and closes."""

    active: bool

    def _handler_failed(self) -> None: ...


def answer(member: Answering, handler: Any, ctx: Any, max_message: int, data: bytes) -> Outcome:
    """One chunk of raw input: DATA when longer than one request may be (framing must
    split it); else the request answered: DONE (no reply), REPLY or RAISED."""
    if len(data) > max_message:
        return DATA, data
    member.active = True  # a whole request (framed input counts only when complete)
    try:
        reply = handler(data, ctx)
    except BaseException as exc:  # SystemExit too: it ends this connection only
        return RAISED, exc
    return _DONE if reply is None else (REPLY, reply)


def handler_raised(member: Answering, exc: BaseException) -> None:
    """End a RAISED outcome: the handler's failure, unless it is a real Ctrl-C."""
    if is_signal_interrupt(exc):
        raise exc
    try:
        raise exc
    except BaseException:
        member._handler_failed()


def _spec_check(spec: object) -> tuple[int, int]:
    """Check a spec as the C helper does; its max_message and kind."""
    if not isinstance(spec, tuple) or len(spec) != 5:
        raise TypeError("poll_fast: a spec is (member, handler, ctx, max_message, kind)")
    max_message = int_arg(spec[3], 0, sys.maxsize, "poll_fast: max_message", ValueError)
    return max_message, int_arg(spec[4], KIND_RAW, KIND_LENGTH, "poll_fast: kind", ValueError)


def _next_message(kind: int, data: bytes, pos: int, max_message: int) -> tuple[int, int, int]:
    """``(start, end, next)`` of the next whole message at ``data[pos:]``, or start -1: a
    partial tail, or a message over the cap (the codec gives its error)."""
    if kind == KIND_LINE:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return -1, 0, 0
        end = nl - 1 if nl > pos and data[nl - 1] == 0x0D else nl
        return (pos if end - pos <= max_message else -1), end, nl + 1
    if len(data) - pos < 4:
        return -1, 0, 0
    need = int.from_bytes(data[pos : pos + 4], "big")
    if need > max_message or need > len(data) - pos - 4:
        return -1, 0, 0
    return pos + 4, pos + 4 + need, pos + 4 + need


def _flush(fd: int, out: list[bytes], append: Any, member: Any) -> int:
    """Send the gathered replies: 0 when all went, else 1 (PARTIAL added) or 2 (ERRNO)."""
    data = b"".join(out)
    out.clear()
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        append((fd, ERRNO, exc.errno, member))
        return 2
    if sent == len(data):
        return 0
    append((fd, PARTIAL, data[sent:], member))
    return 1


def serve_framed(fd: int, spec: Any, fast: dict[int, Any], data: bytes, append: Any) -> None:
    """Serve one chunk of a line or length framed fast connection: the twin of the C
    helper's ``serve_framed`` (framed.c), item for item."""
    member, handler, ctx, max_message, kind = spec
    out: list[bytes] = []
    gathered = pos = sent = 0
    stop: Outcome | None = None
    still_fast = True
    marked = False
    line = kind == KIND_LINE
    while pos < len(data):
        start, end, after = _next_message(kind, data, pos, max_message)
        if start < 0:
            break
        pos = after
        if not marked:  # once per chunk, before its first whole message (framed.c)
            member.active = marked = True
        try:
            reply = handler(data[start:end], ctx)
        except BaseException as exc:  # SystemExit too: it ends this connection only
            stop = (RAISED, exc)
            break
        still_fast = fast.get(fd) is spec
        if reply is None:
            if not still_fast:
                break
            continue
        if not still_fast or type(reply) is not bytes or (not line and len(reply) > MAX_FRAME):
            stop = (REPLY, reply)  # Python frames it, or reports it
            break
        out.append(reply + b"\n" if line else len(reply).to_bytes(4, "big") + reply)
        gathered += len(out[-1])
        if gathered >= FLUSH_AT:
            gathered = 0
            sent = _flush(fd, out, append, member)
            if sent:
                break
    if out:
        if still_fast:
            sent = _flush(fd, out, append, member)
        else:
            append((fd, PARTIAL, b"".join(out), member))  # Python queues it first
    if stop is not None:
        append((fd, stop[0], stop[1], member))
    if pos < len(data) and (stop is None or stop[0] != RAISED) and sent != 2:
        append((fd, DATA, data[pos:] if pos else data, member))


def serve(fd: int, spec: Any, fast: dict[int, Any], append: Any) -> Outcome:
    """Serve one readable fast connection: the twin of the C helper's ``serve_fast``
    (DONE too when ``serve_framed`` appended its own items)."""
    max_message, kind = _spec_check(spec)
    try:
        data = os.read(fd, MAX_SIZE)
    except BlockingIOError:
        return _DONE  # nothing to read after all
    except OSError as exc:
        return ERRNO, exc.errno
    if not data:
        return EOF, None
    if kind != KIND_RAW:
        serve_framed(fd, spec, fast, data, append)
        return _DONE
    outcome = answer(spec[0], spec[1], spec[2], max_message, data)
    reply = outcome[1]
    # The handler ran Python code: send here only while this is still the fast
    # connection at fd (not closed, its fd not reused, not writing).
    if outcome[0] != REPLY or type(reply) is not bytes or fast.get(fd) is not spec:
        return outcome
    try:
        sent = os.write(fd, reply)
    except BlockingIOError:
        return PARTIAL, reply
    except OSError as exc:
        return ERRNO, exc.errno
    return _DONE if sent == len(reply) else (PARTIAL, reply[sent:])


def poll_fast(ep: select.epoll, maxevents: int, fast: dict[int, Any]) -> PollResult:
    """The twin of the C helper's ``poll_fast`` (see the contract in :mod:`.fastio`)."""
    int_arg(maxevents, 1, MAX_EVENTS, "poll_fast: maxevents", ValueError)
    if not isinstance(fast, dict):
        raise TypeError("poll_fast: fast must be a dict")
    events = ep.poll(0, maxevents)
    items: list[tuple[int, int, Any, Any]] = []
    append = items.append
    try:
        for fd, ev in events:
            spec = fast.get(fd) if ev == _IN else None
            if spec is None:
                append((fd, EVENT, ev, None))
                continue
            tag, value = serve(fd, spec, fast, append)
            if tag:
                append((fd, tag, value, spec[0]))
    except BaseException as exc:  # not a handler's (those are outcomes): stops the batch
        return len(events), items, exc
    return len(events), items, None


# -- async handlers ---------------------------------------------------------------------

_enter_task = getattr(asyncio.tasks, "_enter_task", None)
_leave_task = getattr(asyncio.tasks, "_leave_task", None)
#: Whether ``first_step`` can run: a task's context is given to it from 3.11 on.
INLINE_STEPS = sys.version_info >= (3, 11) and _enter_task is not None and _leave_task is not None


def new_task(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, None],
    context: contextvars.Context | None = None,
) -> asyncio.Task[None] | None:
    """Run ``coro`` as a task (in ``context`` from 3.11 on), its first step started at
    once where asyncio can (3.12+): the task, or None when it is done already."""
    task: asyncio.Task[None]
    if sys.version_info >= (3, 12):  # eager: the first step runs inside this call
        task = asyncio.Task(coro, loop=loop, eager_start=True, context=context)
    elif sys.version_info >= (3, 11):
        task = loop.create_task(coro, context=context)
    else:
        task = loop.create_task(coro)
    return None if task.done() else task


def first_step(
    loop: asyncio.AbstractEventLoop,
    task: asyncio.Task[None],
    context: contextvars.Context,
    handler: Any,
    args: tuple[bytes, Any],
) -> Outcome:
    """Run an async handler's first step here, as a step of ``task`` (idle: waiting for
    work), which is the current task meanwhile (``asyncio.timeout`` and cancel scopes see
    it), in its context: DONE with the reply, RAISED with what it raised, REPLY with
    ``(coroutine, what it yielded)`` for the task to go on with (``resume``: it
    suspended), or DATA: not run (another task is running, so ``task`` cannot be the
    current one; nothing was called)."""
    assert _enter_task is not None and _leave_task is not None
    try:
        _enter_task(loop, task)
    except RuntimeError:
        return DATA, None
    try:
        coro = handler(*args)
        if type(coro) is not types.CoroutineType:
            coro = _awaiting(coro)  # an awaitable of another kind
        yielded = context.run(coro.send, None)
    except StopIteration as stop:
        return DONE, stop.value
    except BaseException as exc:  # SystemExit too: it ends this request only
        return RAISED, exc
    finally:
        _leave_task(loop, task)
    return REPLY, (coro, yielded)


async def _awaiting(awaitable: Any) -> Any:
    return await awaitable


@types.coroutine
def resume(
    coro: Coroutine[Any, Any, Any], yielded: Any, throw: BaseException | None = None
) -> Generator[Any, Any, Any]:
    """Go on with ``coro``, whose first step ran elsewhere and yielded ``yielded``, in the
    task that awaits this: each value it yields is the task's, each result or exception
    the task gets goes back to it (``throw``: the first thing to do is throw that in)."""
    value = None
    while True:
        if throw is None:
            try:
                value = yield yielded
            except BaseException as exc:  # the task's cancellation, say
                throw = exc
        try:
            if throw is not None:
                thrown, throw = throw, None
                yielded = coro.throw(thrown)
            else:
                yielded = coro.send(value)
        except StopIteration as stop:
            return stop.value
