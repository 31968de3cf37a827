"""``--workers N``: N worker processes share each endpoint; this parent only watches them.

Sockets: each worker binds its own ``SO_REUSEPORT`` socket for TCP/UDP endpoints;
the parent binds (or reserves a port) only where they cannot: see :mod:`.sharing`.

Workers are fresh interpreters (``python -m sockserve.deploy.worker``), not forks:
the parent may be running the metrics thread, and forking a threaded process is
unsafe. Each gets its instructions pickled on stdin, its sockets as inherited
fds, and a socketpair on which the parent asks it for metrics.

Lifecycle: a worker that dies is restarted after a backoff (0.1 s doubling to
10 s while it keeps dying young). SIGTERM/SIGINT/SIGHUP are forwarded; on
SIGTERM or SIGINT no worker is restarted, each drains, and the parent exits 0
once all have exited (1 if it had to force them). Workers run in their own
session so a terminal's Ctrl-C reaches them once, through the parent, and they
get SIGTERM if the parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from ..logs import server_log
from .activation import InheritedSocket
from .plan import AppSpec, Plan, build_binding, plan_units
from .sharing import SharedSockets

if TYPE_CHECKING:
    from .metrics import MetricsThread, Snapshot

#: A worker exits with this when it could not start (bad service, cannot bind).
EXIT_STARTUP = 3
BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0
#: A worker that lived at least this long is healthy: its next restart is immediate-ish.
HEALTHY_AFTER = 5.0
#: Grace beyond the drain timeout before stuck workers are killed on shutdown.
KILL_GRACE = 5.0
#: How long a scrape waits for the workers' counters (asked all at once) before using the
#: last answer of those that are late; a late answer is read at the next scrape.
SNAPSHOT_TIMEOUT = 2.0


@dataclass
class Worker:
    """One worker slot: the current process, its metrics channel and restart state."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = 0.0
    due: float | None = None  # when to restart it
    last: Snapshot = field(default_factory=list)
    #: Snapshot requests sent and not yet answered, and the bytes of a partial answer.
    asked: int = 0
    inbox: bytearray = field(default_factory=bytearray)


class Supervisor:
    """Start, watch and stop the workers of one ``serve`` invocation."""

    def __init__(self, spec: AppSpec, inherited: list[InheritedSocket]) -> None:
        self.spec = spec
        self.count = spec.workers if spec.workers > 0 else (os.cpu_count() or 1)
        self.inherited = inherited
        self.units = plan_units(spec, Plan(inherited=inherited))
        for unit in self.units:
            build_binding(unit, None)  # import services and check options before any fork
        self.drain_timeout = max(u.config.drain_timeout for u in self.units)
        self.workers = [Worker(i) for i in range(self.count)]
        self.shared = SharedSockets()  # opened by run(), before the first worker
        self.stopping = False
        self.forced = False
        self.failed = False
        self._signals: list[int] = []
        self._kill_at: float | None = None
        self._lock = threading.Lock()
        self._retired: Snapshot = []
        self.metrics_http: MetricsThread | None = None

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self, w: Worker) -> None:
        ours, theirs = socket.socketpair()
        shared = self.shared
        fds = [theirs.fileno(), *shared.prebound.values(), *(i.fd for i in self.inherited)]
        payload = {
            "spec": self.spec,
            "inherited": [(i.fd, i.name) for i in self.inherited],
            "prebound": shared.prebound,
            "ports": shared.ports,
            "channel": theirs.fileno(),
            "parent": os.getpid(),
            "sys_path": sys.path,
        }
        # The child inherits the signal mask: SIGHUP stays blocked (pending, not fatal) from
        # its first instruction until the worker has installed its own disposition.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sockserve.deploy.worker"],
                stdin=subprocess.PIPE,
                pass_fds=fds,
                start_new_session=True,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        theirs.close()
        assert proc.stdin is not None
        try:
            proc.stdin.write(pickle.dumps(payload))
            proc.stdin.close()
        except OSError:
            pass  # it died at once; reaped and reported like any other death
        ours.setblocking(False)
        with self._lock:
            w.proc, w.channel, w.started, w.due = proc, ours, time.monotonic(), None
            w.asked, w.inbox = 0, bytearray()
        server_log.info(
            "worker %d started (pid %d)", w.index, proc.pid, extra={"event": "worker_started"}
        )

    def _reap(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None or w.proc.poll() is None:
                continue
            code, pid = w.proc.returncode, w.proc.pid
            with self._lock:
                if self.spec.metrics:
                    from .metrics import merge, without_gauges

                    self._retired = merge(self._retired, without_gauges(w.last))
                w.last = []
                if w.channel is not None:
                    w.channel.close()
                w.proc, w.channel = None, None
            how = _describe_exit(code)
            if self.stopping:
                server_log.info("worker %d (pid %d) %s", w.index, pid, how)
                continue
            if code == EXIT_STARTUP and w.restarts == 0:
                server_log.error("worker %d (pid %d) could not start; stopping", w.index, pid)
                self.failed = True
                self._begin_stop(signal.SIGTERM)
                continue
            lived = now - w.started
            w.backoff = (
                BACKOFF_MIN
                if lived >= HEALTHY_AFTER
                else min(BACKOFF_MAX, max(BACKOFF_MIN, w.backoff * 2))
            )
            w.due = now + w.backoff
            w.restarts += 1
            server_log.warning(
                "worker %d (pid %d) %s; restarting in %.1fs",
                w.index,
                pid,
                how,
                w.backoff,
                extra={"event": "worker_died"},
            )

    def _forward(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    def _begin_stop(self, sig: int) -> None:
        if self.stopping:
            if sig == signal.SIGINT:
                server_log.warning("second SIGINT: forcing the workers", extra={"event": "force"})
                self.forced = True
                self._forward(signal.SIGINT)
            return
        self.stopping = True
        self._kill_at = time.monotonic() + self.drain_timeout + KILL_GRACE
        self._forward(sig)

    # -- the main loop -----------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT and every worker has drained; return the exit status."""
        self.shared = SharedSockets.prepare(self.units)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in handled}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        from .._sighup import take, take_stop

        if take():  # it came while we were starting: the workers read the file afresh anyway
            self._signals.append(signal.SIGHUP)
        if stop := take_stop():  # a SIGTERM that came while we were starting
            self._signals.append(stop)
        try:
            if self.spec.metrics:
                self._start_metrics_http()
            server_log.info(
                "supervisor (pid %d) starting %d workers",
                os.getpid(),
                self.count,
                extra={"event": "supervisor"},
            )
            for w in self.workers:
                self._spawn(w)
            self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            os.close(wake_r)
            os.close(wake_w)
            self._cleanup()
        server_log.info("supervisor: all workers stopped", extra={"event": "stopped"})
        return 1 if (self.forced or self.failed) else 0

    def _loop(self, wake_r: int) -> None:
        while True:
            now = time.monotonic()
            waits = [w.due - now for w in self.workers if w.due is not None]
            if self._kill_at is not None:
                waits.append(self._kill_at - now)
            timeout = max(0.0, min([1.0, *waits]))
            select.select([wake_r], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
            signals, self._signals = self._signals, []
            for sig in signals:
                if sig in (signal.SIGTERM, signal.SIGINT):
                    server_log.info(
                        "%s received: draining %d workers",
                        signal.Signals(sig).name,
                        self.count,
                        extra={"event": "signal"},
                    )
                    self._begin_stop(sig)
                elif sig == signal.SIGHUP and not self.stopping:
                    server_log.info("SIGHUP received: forwarding to the workers")
                    self._forward(signal.SIGHUP)
            self._reap()
            alive = [w for w in self.workers if w.proc is not None]
            now = time.monotonic()
            if self.stopping:
                if not alive:
                    return
                if self._kill_at is not None and now >= self._kill_at:
                    server_log.warning(
                        "workers still running after the drain timeout: killing them"
                    )
                    self.forced = True
                    self._forward(signal.SIGKILL)
                    self._kill_at = None
                continue
            for w in self.workers:
                if w.proc is None and w.due is not None and now >= w.due:
                    self._spawn(w)

    def _cleanup(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(5)
            if w.channel is not None:
                w.channel.close()
        self.shared.close()
        if self.metrics_http is not None:
            self.metrics_http.close()

    # -- metrics -----------------------------------------------------------------------------

    def _start_metrics_http(self) -> None:
        from .metrics import MetricsThread

        assert self.spec.metrics is not None
        self.metrics_http = MetricsThread(self.spec.metrics, self.snapshot, scope="all workers")

    def snapshot(self) -> Snapshot:
        """Every worker's counters summed (called by the metrics thread at scrape time).

        Every worker is asked at once and answers are awaited for SNAPSHOT_TIMEOUT in
        all; a worker that is late (stopped, swapping) counts with its last answer, and
        its channel stays open: the late answer is read, in order, at the next scrape.
        """
        from .metrics import merge

        with self._lock:
            for w in self.workers:
                if w.channel is not None and not w.asked:
                    try:
                        w.channel.send(b"?")
                        w.asked += 1
                    except OSError:
                        pass  # it is dying: reaped and restarted by the main loop
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT
            while True:
                waiting = [w for w in self.workers if w.channel is not None and w.asked]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                socks = [w.channel for w in waiting if w.channel is not None]
                ready, _, _ = select.select(socks, [], [], left)
                for w in waiting:
                    if w.channel in ready:
                        _read_answers(w)
            return merge(self._retired, *(w.last for w in self.workers))


def _read_answers(w: Worker) -> None:
    """Take what the worker sent: each whole frame is a snapshot, the newest one wins."""
    import json

    assert w.channel is not None
    try:
        chunk = w.channel.recv(1 << 20)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        chunk = b""
    if not chunk:
        w.asked = 0  # it closed the channel (exiting): keep its last answer
        return
    w.inbox += chunk
    while len(w.inbox) >= 4:
        size = int.from_bytes(w.inbox[:4], "big")
        if len(w.inbox) < 4 + size:
            break
        frame = bytes(w.inbox[4 : 4 + size])
        del w.inbox[: 4 + size]
        w.asked = max(0, w.asked - 1)
        if frame:  # empty: its snapshot failed; keep the last one
            with contextlib.suppress(ValueError):
                w.last = json.loads(frame)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
