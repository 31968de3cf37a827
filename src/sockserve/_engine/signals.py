"""SIGTERM/SIGINT for a serving process, obeyed even while a handler blocks the event loop.

Why not only ``loop.add_signal_handler``: its callbacks run when the loop turns, and a
sync handler stuck in ``time.sleep(60)`` or a busy loop keeps the loop from turning, so
SIGTERM's drain timeout and the second SIGINT went unheard. A Python-level handler
(``signal.signal``) runs in the main thread between bytecodes, also inside a blocked
handler (``time.sleep`` is interrupted, the handler runs, the sleep resumes). Ours only
sets flags, wakes the loop for the usual graceful stop, and arms a watchdog thread that
ends the process with ``os._exit`` if the loop has not finished by the deadline:
``--drain-timeout`` plus :data:`EXIT_GRACE` after the first signal, :data:`FORCE_GRACE`
after a second SIGINT. When the loop is free the graceful path finishes first and the
watchdog never fires.

While these handlers are installed a SIGINT never raises ``KeyboardInterrupt``, so one
raised by handler code is the handler's own: :func:`is_signal_interrupt` tells the
request paths whether to treat it as any other handler error. :func:`descheduled` tells
them whether a slow call blocked the loop or the machine ran something else meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..logs import server_log

#: After the first SIGTERM/SIGINT the process exits by drain timeout + this even if a
#: handler blocks the loop: room for the graceful path to close what the drain left.
EXIT_GRACE = 1.0
#: After a second SIGINT: the loop's forced stop takes milliseconds when it is free; a
#: blocked loop is left behind after this (the item asks for an exit under 1 s).
FORCE_GRACE = 0.3
#: When the loop has not taken a signal up after this, the watchdog says why (it is blocked).
NOTICE_AFTER = 0.5
#: How often the watchdog looks at its deadline (no locks are shared with the handler).
_WATCH_POLL = 0.02
#: The exit status of a process the watchdog ends: 1, as for a forced stop.
EXIT_FORCED = 1
#: Longest the watchdog waits for its last log line to be written before exiting.
_LOG_WAIT = 0.5

_owned = False


def is_signal_interrupt(exc: BaseException) -> bool:
    """Whether ``exc``, raised out of a handler, is a real Ctrl-C and must stop the server.

    While :class:`StopSignals` is installed no signal raises ``KeyboardInterrupt``; in a
    thread other than the main one none ever does. Elsewhere (the main thread under
    Python's default SIGINT handler, or another program's) the two cannot be told apart,
    and a Ctrl-C must still stop the server.
    """
    if not isinstance(exc, KeyboardInterrupt):
        return False
    return not _owned and threading.current_thread() is threading.main_thread()


def descheduled() -> float:
    """Seconds this thread waited for a CPU since its last call (Linux schedstat; 0
    elsewhere): a call that took long because the machine ran others is not blocking."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            waited = int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0
    before = _WAITED.get(tid := threading.get_ident(), waited)
    _WAITED[tid] = waited
    return waited - before


_WAITED: dict[int, float] = {}


class StopSignals:
    """Python-level SIGTERM/SIGINT handlers for one server, and their watchdog.

    ``on_loop(name)`` runs on the event loop for each signal (the graceful or forced
    stop); ``stopping()`` says whether a stop is already under way (then a SIGINT forces);
    ``cleanup()`` runs in the watchdog just before a hard exit (removing socket files).
    """

    def __init__(
        self,
        call_soon_threadsafe: Callable[..., Any],
        on_loop: Callable[[str], None],
        drain_timeout: Callable[[], float],
        stopping: Callable[[], bool],
        cleanup: Callable[[], None],
    ) -> None:
        self._call_soon_threadsafe = call_soon_threadsafe
        self._on_loop = on_loop
        self._drain_timeout = drain_timeout
        self._stopping = stopping
        self._cleanup = cleanup
        self._previous: dict[int, Any] = {}
        self._deadline: float | None = None
        self._reason = ""
        self._signalled = ""  # the name of the last signal, until the loop takes it up
        self._signalled_at = 0.0
        self._done = False
        self._watchdog: threading.Thread | None = None

    def install(self) -> None:
        """Take SIGTERM and SIGINT (main thread only: ``signal.signal`` raises elsewhere)."""
        global _owned
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        _owned = True

    def uninstall(self) -> None:
        """Give the signals back and disarm the watchdog (the loop finished on its own)."""
        global _owned
        self.disarm()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        _owned = False

    def disarm(self) -> None:
        self._done = True

    def deliver(self, signum: int) -> None:
        """Act on a signal that arrived before :meth:`install` (held at start-up)."""
        self._on_signal(signum, None)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs between bytecodes of whatever the main thread does, maybe a blocked
        # handler: no logging here (its locks may be held), only flags and wake-ups.
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._done:
            return
        if signum == signal.SIGINT and (self._deadline is not None or self._stopping()):
            self._arm(now + FORCE_GRACE, "second SIGINT")
        elif self._deadline is None:
            self._arm(now + self._drain_timeout() + EXIT_GRACE, f"{name}: drain timeout passed")
        if not self._signalled:
            self._signalled, self._signalled_at = name, now
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing left to stop
            self._call_soon_threadsafe(self._heard, name)

    def _heard(self, name: str) -> None:
        """On the loop: the signal got through; stop as usual."""
        self._signalled = ""
        self._on_loop(name)

    def _arm(self, deadline: float, reason: str) -> None:
        if self._deadline is None or deadline < self._deadline:
            self._deadline, self._reason = deadline, reason
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch, name="sockserve-stop-watchdog", daemon=True
            )
            self._watchdog.start()

    def _watch(self) -> None:
        noticed = ""
        while not self._done:
            now = time.monotonic()
            deadline = self._deadline
            if deadline is not None and now >= deadline:
                self._hard_exit()
            name = self._signalled
            if name and name != noticed and now - self._signalled_at >= NOTICE_AFTER:
                noticed = name
                _log_aside(
                    "%s received, but a handler blocks the event loop; exiting in %.1fs "
                    "unless it returns",
                    name,
                    max(0.0, (deadline or now) - now),
                )
            time.sleep(_WATCH_POLL)

    def _hard_exit(self) -> None:
        """The loop is still blocked past the deadline: log, flush, and end the process."""
        reason = self._reason

        writer = _log_aside(
            "%s while a handler blocks the event loop; exiting now (status %d)",
            reason,
            EXIT_FORCED,
            level=logging.ERROR,
            then=self._cleanup,
        )
        writer.join(_LOG_WAIT)
        if not self._done:
            os._exit(EXIT_FORCED)


def _log_aside(
    msg: str, *args: object, level: int = logging.WARNING, then: Callable[[], None] | None = None
) -> threading.Thread:
    """Log (and flush) from a thread of its own: a log handler stuck on a full pipe must
    not hold up the watchdog, whose one job is to end the process."""

    def write() -> None:
        server_log.log(level, msg, *args, extra={"event": "force"})
        if then is not None:
            then()
        logger: logging.Logger | None = server_log
        while logger is not None:
            for handler in logger.handlers:
                handler.flush()
            logger = logger.parent if logger.propagate else None
        sys.stderr.flush()

    writer = threading.Thread(target=write, name="sockserve-stop-log", daemon=True)
    writer.start()
    return writer
