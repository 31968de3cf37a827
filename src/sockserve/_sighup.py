"""SIGHUP before a serving process is ready: remembered, never fatal.

SIGHUP's default action kills. A reload signal that lands while a process is still
importing or binding (a supervisor forwarding it to a worker it just started, a
``systemctl reload`` racing a start) must not kill it: :func:`hold` replaces the
default with a flag as the very first thing the entry point does (this module
imports only :mod:`signal`), and the app asks :func:`take` once it can reload.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_pending = False


def _note(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = True


def hold() -> None:
    """Catch SIGHUP as a flag from now on, and unblock it (a supervisor starts us with it blocked)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (an embedding program's business)
    signal.signal(signal.SIGHUP, _note)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def take() -> bool:
    """Whether a SIGHUP arrived while held; clears it."""
    global _pending
    was, _pending = _pending, False
    return was
