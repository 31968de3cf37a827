"""The engine's shared vocabulary, imported by every other engine module and importing none.

Close reasons and how a failure is described in a log line; giving freed memory back
to the OS after a wave of connections.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import cast

#: Give freed memory back to the OS (malloc_trim) once a listener's connections fall to
#: a quarter of their peak, when that peak was at least this many: a wave of connections
#: that all closed (glibc keeps what they freed, 50-300 KB each for TLS, for good).
TRIM_PEAK = 256
#: ...at most this often per process (a trim walks the whole heap: milliseconds).
TRIM_EVERY = 1.0

_trim: Callable[[int], int] | None = None
_last_trim = -TRIM_EVERY
_trim_scheduled_for = -TRIM_EVERY  # a loop that closes first just never runs it


def _load_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (musl, other systems)."""
    try:
        import ctypes

        return cast(Callable[[int], int], ctypes.CDLL(None).malloc_trim)
    except (OSError, AttributeError, ImportError):
        return None


def release_memory(loop: asyncio.AbstractEventLoop) -> None:
    """Give the heap's free memory back to the OS, at most once per TRIM_EVERY.

    Why: glibc keeps memory that many connections freed at once (TLS buffers, socket
    reads) in its arenas, and RSS stays at the peak of the largest wave for good;
    ``malloc_trim(0)`` returns it. Delayed a little, so a wave that is still closing
    costs one trim, not one per connection.
    """
    global _trim, _trim_scheduled_for
    if _trim is None:
        _trim = _load_trim() or (lambda pad: 0)
    now = time.monotonic()
    if now < _trim_scheduled_for:
        return  # one is due already
    _trim_scheduled_for = max(now + 0.05, _last_trim + TRIM_EVERY)
    loop.call_later(_trim_scheduled_for - now, _run_trim)


def _run_trim() -> None:
    global _last_trim
    _last_trim = time.monotonic()
    if _trim is not None:
        _trim(0)


#: Close reasons counted as errors, by prefix (the metrics' ``kind`` label).
_ERROR_KINDS = (
    ("protocol error", "protocol"),
    ("PROXY header", "proxy"),
    ("idle for", "idle_timeout"),
    ("drain timeout", "drain_timeout"),
    ("denied", "denied"),
    ("error:", "reset"),
)


def error_kind(reason: str) -> str | None:
    for prefix, kind in _ERROR_KINDS:
        if reason.startswith(prefix):
            return kind
    return None


def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
