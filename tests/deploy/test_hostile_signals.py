"""Hostile-client pass, signals at bad moments: during start-up and after the stop.

A service module that is slow to import (or to tear down) holds the process in the window
being tested, and writes a marker file when it is there, so each signal lands in that
window for sure (a readiness wait, not a guess at timing). Real ``sockserve serve``
subprocesses on loopback and Unix paths; every wait is bounded.
"""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

from faultkit import LoggedServer
from support import wait_for

SLOW_IMPORT = """
    import pathlib, time
    pathlib.Path({marker!r}).write_text("importing")
    time.sleep(1.5)

    def handler(request, ctx):
        return b"ok " + request
"""

SLOW_TEARDOWN = """
    import builtins, time

    class _Slow:
        # What it needs is bound now: at teardown the module's globals may be gone.
        def __del__(self, _open=open, _sleep=time.sleep, _path={marker!r}):
            with _open(_path, "w") as f:
                f.write("tearing down")
            _sleep(1.0)

    # Kept in builtins, which the interpreter clears last, after it has restored the
    # default signal actions (a module global stays referenced by daemon threads).
    builtins._hostile_slow_teardown = _Slow()

    def handler(request, ctx):
        return b"ok " + request
"""


def _module(tmp_path: Path, name: str, source: str) -> Path:
    marker = tmp_path / f"{name}.marker"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source.format(marker=str(marker))))
    return marker


def _start(tmp_path: Path, name: str, sock: Path) -> LoggedServer:
    """The server, without waiting for 'listening on' (it is not there yet)."""
    return LoggedServer(
        f"{name}:handler",
        "--app-dir",
        str(tmp_path),
        "--listen",
        f"unix://{sock}",
        ready=0,
    )


def test_sigterm_during_start_up_is_a_graceful_stop(tmp_path: Path, sock_dir: Path) -> None:
    """SIGTERM while the service is still importing: before, death by signal (status -15,
    nothing logged); now the server starts, drains, removes its socket file, exits 0."""
    marker = _module(tmp_path, "slowimport", SLOW_IMPORT)
    sock = sock_dir / "s.sock"
    with _start(tmp_path, "slowimport", sock) as srv:
        wait_for(marker.exists, 15, "the service import to begin")
        srv.signal(signal.SIGTERM)
        rc, log = srv.wait(20)
    assert rc == 0, log
    assert "SIGTERM received: shutting down" in log
    assert not sock.exists()


def test_sigint_during_start_up_exits_130_without_a_traceback(
    tmp_path: Path, sock_dir: Path
) -> None:
    """Ctrl-C while importing: status 130 and no KeyboardInterrupt traceback (item 20)."""
    marker = _module(tmp_path, "slowimport2", SLOW_IMPORT)
    with _start(tmp_path, "slowimport2", sock_dir / "s.sock") as srv:
        wait_for(marker.exists, 15, "the service import to begin")
        srv.signal(signal.SIGINT)
        rc, log = srv.wait(20)
    assert rc == 130, log
    assert "Traceback" not in log, log


def test_a_late_second_sigterm_does_not_kill_a_server_that_stopped(
    tmp_path: Path, sock_dir: Path
) -> None:
    """A second SIGTERM that lands while the stopped process tears down (the interpreter
    restores the fatal default there) leaves status 0, not death by signal."""
    marker = _module(tmp_path, "slowteardown", SLOW_TEARDOWN)
    with _start(tmp_path, "slowteardown", sock_dir / "s.sock") as srv:
        srv.wait_line("listening on ", timeout=15)
        srv.signal(signal.SIGTERM)
        wait_for(marker.exists, 15, "the interpreter's teardown")
        srv.signal(signal.SIGTERM)
        rc, log = srv.wait(20)
    assert rc == 0, log
    assert "stopped" in log


def test_drain_timeout_zero_with_nothing_open_is_no_warning(sock_dir: Path) -> None:
    """``--drain-timeout 0`` and no client: a clean stop, not "drain timeout: closing 0
    connection(s) still open" at WARNING (the wait timed out before it could see that
    nothing was open)."""
    with LoggedServer(
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        f"unix://{sock_dir / 's.sock'}",
        "--drain-timeout",
        "0",
        ready=2,
    ) as srv:
        srv.signal(signal.SIGTERM)
        rc, log = srv.wait(20)
    assert rc == 0, log
    assert "drain timeout" not in log and "WARNING" not in log, log
