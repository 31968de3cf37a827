"""SIGHUP (and the CLI's SIGTERM) before a serving process is ready: remembered, never fatal.

SIGHUP's default action kills. A reload signal that lands while a process is still
importing or binding (a supervisor forwarding it to a worker it just started, a
``systemctl reload`` racing a start) must not kill it: :func:`hold` replaces the
default with a flag as the very first thing the entry point does (this module
imports only :mod:`signal`), and the app asks :func:`take` once it can reload.

SIGTERM during start-up (``systemctl stop`` racing a start) is held the same way by
:func:`hold_stop` and replayed once the server can drain: a graceful stop with status 0
and socket files removed, not a death by signal. Held for good afterwards, a SIGTERM
that lands after the drain, while the process exits, no longer turns status 0 into -15.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_pending = False
_stop_pending = 0  # the SIGTERM held by hold_stop, until taken


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


def _note_stop(signum: int, frame: FrameType | None) -> None:
    global _stop_pending
    _stop_pending = signum


def hold_stop() -> None:
    """Catch SIGTERM as a flag until the server installs its own stop handlers."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _note_stop)


def take_stop() -> int:
    """The SIGTERM that arrived while held (0 if none); clears it."""
    global _stop_pending
    was, _stop_pending = _stop_pending, 0
    return was
