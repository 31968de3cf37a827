"""Issue 12 item 2: an ``async def`` handler's first step runs where its request was read.

Each connection has one worker task; a request that comes while it waits for work has
its handler's first step run at once, as a step of that task (3.11+). What a handler can
see must not change for it: it runs inside a task (``asyncio.current_task()``,
``asyncio.timeout``), its context variables stay its connection's, a handler that
suspends goes on (in order with what follows) and is cancelled when its connection
goes, and one that raises ends only its connection. Each case runs on the epoll hub (C
fast path or its twin) and on asyncio transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from support import addr_of, wait_for

import sockserve
from sockserve.server import ServerThread

TIMEOUT = 10.0
SEEN: contextvars.ContextVar[bytes] = contextvars.ContextVar("SEEN", default=b"-")

ENGINES = ["auto", "asyncio"]


def _lines(url: str, requests: list[bytes]) -> list[bytes]:
    """Send the requests pipelined on one connection; their replies, in order."""
    with socket.create_connection(addr_of(url), timeout=TIMEOUT) as s:
        s.sendall(b"".join(r + b"\n" for r in requests))
        got = b""
        while got.count(b"\n") < len(requests):
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    return got.split(b"\n")[:-1]


def _one_by_one(url: str, requests: list[bytes]) -> list[bytes]:
    """Send each request on one connection once the last was answered (its worker is
    then waiting for work: the next one's first step runs where it is read)."""
    with sockserve.connect(url, timeout=TIMEOUT, framing="line") as c:
        return [c.request(r) or b"" for r in requests]


def _serve(handler: Callable[..., Any], engine: str) -> ServerThread:
    return ServerThread(handler, "tcp://127.0.0.1:0", framing="line", engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_the_first_step_runs_inside_a_task_and_asyncio_timeout_works(engine: str) -> None:
    """``current_task()`` is a task in every step, and ``asyncio.timeout`` (it cancels the
    task it was entered in) ends a wait begun in the first step, not the connection."""

    async def handler(request: bytes, ctx: sockserve.Context) -> bytes:
        if asyncio.current_task() is None:
            return b"no task"
        if request == b"wait":
            try:
                if sys.version_info >= (3, 11):
                    async with asyncio.timeout(0.05):
                        await asyncio.sleep(TIMEOUT)
                else:  # no asyncio.timeout before 3.11
                    await asyncio.wait_for(asyncio.sleep(TIMEOUT), 0.05)
            except (TimeoutError, asyncio.TimeoutError):
                return b"timed out"
        return b"ok " + request

    requests = [b"a", b"wait", b"b", b"wait", b"c"]
    want = [b"ok a", b"timed out", b"ok b", b"timed out", b"ok c"]
    with _serve(handler, engine) as srv:
        assert _one_by_one(srv.url("tcp"), requests) == want
        assert _lines(srv.url("tcp"), requests) == want


@pytest.mark.parametrize("engine", ENGINES)
def test_context_variables_stay_with_their_connection(engine: str) -> None:
    """A handler's ``ContextVar.set`` is not seen by another connection's handler (the
    first step runs in its worker's context, not in the loop's)."""

    async def handler(request: bytes, ctx: sockserve.Context) -> bytes:
        before = SEEN.get()
        SEEN.set(request)
        return before

    with _serve(handler, engine) as srv:
        url = srv.url("tcp")
        assert _one_by_one(url, [b"x1", b"x2", b"x3"])[0] == b"-"
        assert _one_by_one(url, [b"y1", b"y2"])[0] == b"-"  # a new connection: not x*


@pytest.mark.parametrize("engine", ENGINES)
def test_a_handler_that_suspends_keeps_the_order_of_what_follows(engine: str) -> None:
    """Requests pipelined behind one whose handler suspended are answered after it."""

    async def handler(request: bytes, ctx: sockserve.Context) -> bytes:
        if request.startswith(b"nap"):
            await asyncio.sleep(0.02)
        if request.startswith(b"yield"):
            await asyncio.sleep(0)
        return request.upper()

    requests = [b"nap1", b"a", b"yield1", b"b", b"nap2", b"nap3", b"c", b"yield2"]
    with _serve(handler, engine) as srv:
        for _ in range(3):
            assert _lines(srv.url("tcp"), requests) == [r.upper() for r in requests]
        assert _one_by_one(srv.url("tcp"), requests) == [r.upper() for r in requests]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_suspended_handler_is_cancelled_when_its_connection_goes(engine: str) -> None:
    """The client resets the connection while the handler waits (it suspended in its
    first step): the handler gets CancelledError, as in a task of its own, and the
    server goes on."""
    entered, cancelled = threading.Event(), threading.Event()

    async def handler(request: bytes, ctx: sockserve.Context) -> bytes:
        if request == b"hang":
            entered.set()
            try:
                await asyncio.sleep(TIMEOUT * 3)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return request

    with _serve(handler, engine) as srv:
        url = srv.url("tcp")
        with socket.create_connection(addr_of(url), timeout=TIMEOUT) as s:
            s.sendall(b"hang\n")
            wait_for(entered.is_set, TIMEOUT, "the handler")
            # Reset, not closed: after a half-close the server would still answer.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_for(cancelled.is_set, TIMEOUT, "the handler's cancellation")
        assert _lines(url, [b"still here"]) == [b"still here"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_handler_that_raises_in_its_first_step_ends_only_its_connection(engine: str) -> None:
    async def handler(request: bytes, ctx: sockserve.Context) -> bytes:
        if request == b"raise":
            raise ValueError("asked to")
        return request

    with _serve(handler, engine) as srv:
        url = srv.url("tcp")
        assert _one_by_one(url, [b"one", b"two"]) == [b"one", b"two"]
        with socket.create_connection(addr_of(url), timeout=TIMEOUT) as s:
            s.sendall(b"ok\n")
            assert s.recv(100) == b"ok\n"
            s.sendall(b"raise\nnever\n")  # "raise" met by a waiting worker
            with contextlib.suppress(ConnectionResetError):  # closed with input unread
                assert s.recv(100) == b""  # closed, "never" not answered
        assert _lines(url, [b"two", b"three"]) == [b"two", b"three"]
