"""Handlers the subprocess tests load as ``fault_services:NAME`` (tests/ is put on PYTHONPATH).

``gated``: an async handler that logs ``gated start <request>`` and then waits until the
file named by $FAULT_GATE exists, so a test can hold any number of requests in flight,
act (send SIGTERM...), then release them. It replies ``done <request>``.
"""

from __future__ import annotations

import asyncio
import logging
import os

from sockserve import Context

log = logging.getLogger("sockserve.service")

#: How often a gated request looks for its release file (bounded by the test's deadlines).
GATE_POLL = 0.01


async def gated(request: bytes, ctx: Context) -> bytes:
    log.info("gated start %s", request.decode(errors="replace"))
    gate = os.environ["FAULT_GATE"]
    while not os.path.exists(gate):
        await asyncio.sleep(GATE_POLL)
    return b"done " + request


def upper(request: bytes, ctx: Context) -> bytes:
    return request.upper()


def raising(request: bytes, ctx: Context) -> bytes:
    if request.startswith(b"boom"):
        raise RuntimeError("boom requested by the test")
    return b"ok " + request


def every_outcome(request: bytes, ctx: Context) -> bytes | str | BaseException | None:
    """One request per way a raw handler can end (see test_fastio): each is a separate
    exit of the C fast path."""
    if request == b"boom":
        raise RuntimeError("boom requested by the test")
    if request == b"none":
        return None
    if request == b"str":
        return "not bytes"
    if request == b"exception":
        return KeyboardInterrupt()  # returned, not raised: a reply that is not bytes
    if request == b"big":
        return b"x" * (4 << 20)  # more than the socket buffer takes at once
    return b"ok " + request


# A2 -- datagram handlers that end a request with a BaseException (issue 10, item 1);
# ``exits`` itself is defined below (shared with the stream tests).


async def aexits(request: bytes, ctx: Context) -> bytes:
    """The async twin of :func:`exits`."""
    await asyncio.sleep(0)
    return exits(request, ctx)


def interrupts(request: bytes, ctx: Context) -> bytes:
    """``kbd`` raises KeyboardInterrupt from handler code (what happens next is the
    signal handling's business); anything else is answered."""
    if request.startswith(b"kbd"):
        raise KeyboardInterrupt
    return b"ok " + request


# C: client-side faults (issue 10 items 18, 21): handlers the client tests call.


def million(request: bytes, ctx: Context) -> bytes:
    """A 1,000,000-byte reply: more than one recv, more than the default --max-message."""
    return b"m" * 999_999 + b"\n"


def sized(request: bytes, ctx: Context) -> bytes:
    """``N``: reply N bytes of ``s`` (for replies of chosen sizes); anything else: ``ok REQ``."""
    if request.strip().isdigit():
        return b"s" * int(request.strip())
    return b"ok " + request


def _exit_by_request(request: bytes) -> bytes:
    """What ``exits``/``exits_async`` do for each request (see test_engine_robustness)."""
    import argparse
    import sys
    import time

    if request.startswith(b"exit"):
        sys.exit(2)
    if request.startswith(b"argparse"):  # a CLI parser inside a handler exits on bad input
        argparse.ArgumentParser(prog="handler-cli").parse_args(["--no-such-option"])
    if request.startswith(b"kbi"):
        raise KeyboardInterrupt  # the handler's own, not a signal's
    if request.startswith(b"base"):
        raise HandlerBaseError("a BaseException from the handler")
    if request.startswith(b"nap"):  # long enough for a signal to arrive while it runs
        log.info("napping %s", request.decode(errors="replace"))
        time.sleep(0.5)
    if request.startswith(b"block"):  # stuck in blocking code: time.sleep or a busy loop
        log.info("blocking %s", request.decode(errors="replace"))
        end = time.monotonic() + 60
        if request.startswith(b"block spin"):
            while time.monotonic() < end:
                pass
        else:
            time.sleep(60)
    return b"ok " + request


class HandlerBaseError(BaseException):
    """Neither an Exception nor a signal: what a handler may raise by mistake."""


def exits(request: bytes, ctx: Context) -> bytes:
    return _exit_by_request(request)


async def exits_async(request: bytes, ctx: Context) -> bytes:
    await asyncio.sleep(0)
    return _exit_by_request(request)
