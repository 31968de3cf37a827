"""The raw request/reply fast path, written once in Python beside its C twin.

``poll_fast`` is the pure-Python twin of the C helper's ``poll_fast`` (the hub runs
it without the helper); ``answer`` is its middle (one whole request: mark the
connection active, call the handler, say how it ended), which the other paths that
already hold the bytes (``FastStream._received``, ``StreamProtocol.data_received``)
call too. Both return the tagged outcomes of the contract written in the docstring
of :mod:`.fastio`; ``handler_raised`` is how every path ends a RAISED one.

Room for what comes next: a spec names its framing kind (``KIND_RAW`` only so far),
so line and length framing, or async handlers, become new kinds served by this one
routine and its C twin, not new copies of it.
"""

from __future__ import annotations

import os
import select
import sys
from typing import Any, Protocol

from .fastio import (
    DATA,
    DONE,
    EOF,
    ERRNO,
    EVENT,
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


def _spec_max(spec: object) -> int:
    """Check a spec as the C helper does; its max_message."""
    if not isinstance(spec, tuple) or len(spec) != 5:
        raise TypeError("poll_fast: a spec is (member, handler, ctx, max_message, kind)")
    max_message = int_arg(spec[3], 0, sys.maxsize, "poll_fast: max_message", ValueError)
    int_arg(spec[4], KIND_RAW, KIND_RAW, "poll_fast: kind", ValueError)
    return max_message


def serve(fd: int, spec: Any, fast: dict[int, Any]) -> Outcome:
    """Serve one readable fast connection: the twin of the C helper's ``serve_fast``."""
    max_message = _spec_max(spec)
    try:
        data = os.read(fd, MAX_SIZE)
    except BlockingIOError:
        return _DONE  # nothing to read after all
    except OSError as exc:
        return ERRNO, exc.errno
    if not data:
        return EOF, None
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
            tag, value = serve(fd, spec, fast)
            if tag:
                append((fd, tag, value, spec[0]))
    except BaseException as exc:  # not a handler's (those are outcomes): stops the batch
        return len(events), items, exc
    return len(events), items, None
