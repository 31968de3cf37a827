"""An ``async def`` handler's steps run without a task per request.

``first_step`` runs a handler's first step where the request was read, as a step of its
connection's idle worker task (see ``_engine/requests.RequestQueue``), so a handler that
does not suspend is answered with no task made and no loop turn; one that suspends goes
on in that task (``resume``). ``new_task`` starts a task eagerly where asyncio can.

Bottom layer: asyncio alone, nothing of sockserve.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import types
from collections.abc import Coroutine, Generator
from typing import Any

#: What ``first_step`` says of a step: its ``(tag, value)``.
Step = tuple[int, Any]
DONE, RAISED, SUSPENDED, NOT_RUN = range(4)

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
) -> Step:
    """Run an async handler's first step here, as a step of ``task`` (idle: waiting for
    work), which is the current task meanwhile (``asyncio.timeout`` and cancel scopes see
    it), in its context: DONE with the reply, RAISED with what it raised, SUSPENDED with
    ``(coroutine, what it yielded)`` for the task to go on with (``resume``), or
    NOT_RUN (another task is running, so ``task`` cannot be the
    current one; nothing was called)."""
    assert _enter_task is not None and _leave_task is not None
    try:
        _enter_task(loop, task)
    except RuntimeError:
        return NOT_RUN, None
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
    return SUSPENDED, (coro, yielded)


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
