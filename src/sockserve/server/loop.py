"""The event loop: uvloop when installed (the default dependency on Linux), else asyncio; its error log."""

from __future__ import annotations

import asyncio
from typing import Any

from ..errors import SockserveError
from ..logs import server_log


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: expected I/O errors at info, anything else with its traceback."""
    exc = context.get("exception")
    msg = context.get("message", "event loop error")
    if exc is not None and isinstance(exc, (OSError, SockserveError)):
        server_log.info("%s: %s", msg, exc)
    else:
        server_log.error("%s", msg, exc_info=exc if isinstance(exc, BaseException) else None)
