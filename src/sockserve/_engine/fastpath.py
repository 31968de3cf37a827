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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import sys
from typing import Any, Protocol

from .fastio import (
    BIG_READ,
    DATA,
    DONE,
    EOF,
    ERRNO,
    EVENT,
    KIND_LINE,
    KIND_PUMP,
    KIND_RAW,
    MAX_EVENTS,
    MAX_SIZE,
    PARTIAL,
    PIPE_SIZE,
    PUMP_READS,
    PUMP_STATE,
    RAISED,
    REPLY,
    PollResult,
    int_arg,
)
from .signals import is_signal_interrupt

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
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
    return max_message, int_arg(spec[4], KIND_RAW, KIND_PUMP, "poll_fast: kind", ValueError)


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
    if kind == KIND_PUMP:
        return serve_pump(fd, spec, max_message)  # max_message: its splice threshold
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


_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _send_some(peer: int, data: bytes | memoryview) -> int:
    """Send data to peer until it takes no more: the count sent (OSError on failure)."""
    done = 0
    while done < len(data):
        try:
            done += os.write(peer, data[done:])
        except BlockingIOError:
            break
    return done


def _drain_pipe(pipe_r: int, peer: int, left: int) -> int:
    """Move what the pipe holds to peer: what is still left (OSError on failure)."""
    while left > 0:
        try:
            left -= os.splice(pipe_r, peer, left, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            break
    return left


def _pump_splice(fd: int, peer: int, s: memoryview) -> Outcome:
    for _ in range(PUMP_READS):
        try:
            got = os.splice(fd, s[3], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return _DONE
        except OSError as exc:
            return ERRNO, exc.errno
        if not got:
            return EOF, None
        try:
            left = _drain_pipe(s[2], peer, got)
        except OSError as exc:
            return ERRNO, exc.errno
        s[0] += got - left
        if left:
            s[4] = left
            return PARTIAL, None
        if got < BIG_READ:
            break
    return _DONE


def _open_pipe(s: memoryview) -> None:
    try:
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # out of descriptors: it keeps copying
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
    s[2], s[3] = pipe_r, pipe_w


def serve_pump(fd: int, spec: Any, splice_after: int) -> Outcome:
    """One readable socket of a relayed pair: the twin of the C helper's ``serve_pump``
    (pump.c; the contract's KIND_PUMP): its bytes to the peer, through a pipe once big."""
    peer = int_arg(spec[1], _INT_MIN, _INT_MAX, "poll_fast: a pump's peer fd", OverflowError)
    state = spec[2]
    if type(state) is not bytearray or len(state) < PUMP_STATE:
        raise TypeError("poll_fast: a pump's state is a bytearray of 40 bytes")
    s = memoryview(state)[:PUMP_STATE].cast("q")
    if s[4] > 0:
        return PARTIAL, None  # still holding: not read until it has gone
    if s[2] < 0 and s[1] >= splice_after:
        _open_pipe(s)
    if s[2] >= 0:
        return _pump_splice(fd, peer, s)
    for _ in range(PUMP_READS):
        try:
            data = os.read(fd, MAX_SIZE)
        except BlockingIOError:
            return _DONE
        except OSError as exc:
            return ERRNO, exc.errno
        if not data:
            return EOF, None
        try:
            sent = _send_some(peer, data)
        except OSError as exc:
            return ERRNO, exc.errno
        s[0] += sent
        if sent < len(data):
            return PARTIAL, data[sent:]
        if len(data) >= BIG_READ:
            s[1] += len(data)
        if len(data) < MAX_SIZE:
            break
        if s[2] < 0 and s[1] >= splice_after:
            _open_pipe(s)
            if s[2] >= 0:
                return _pump_splice(fd, peer, s)
    return _DONE


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
