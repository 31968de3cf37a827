"""Test helpers: the CLI as a subprocess, server subprocesses, readiness waits, socket reads."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

    from sockserve.endpoints import Endpoint

SOCKSERVE = [sys.executable, "-m", "sockserve"]
#: This directory: on PYTHONPATH for subprocesses, so they load handlers from the helpers here.
TESTS_DIR = str(Path(__file__).resolve().parent)

#: A timestamp reply: ``[ctime] request``.
STAMP = re.compile(rb"^\[(\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})\] (.*)$", re.S)


def check_stamp(reply: bytes, request: bytes) -> None:
    m = STAMP.match(reply)
    assert m, reply
    assert m.group(2) == request
    assert len(m.group(1)) == 24
    stamp = time.mktime(time.strptime(m.group(1).decode(), "%a %b %d %H:%M:%S %Y"))
    assert abs(stamp - time.time()) < 5


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 right now, for a program that cannot be
    given port 0 and tell us which it took (a tool, a documented command line)."""
    while True:
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


def run_cli(
    *args: str, input: bytes | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*SOCKSERVE, *args], input=input, capture_output=True, timeout=timeout, check=False
    )


class ServerProcess:
    """A server (``sockserve serve ARGS``, or any ``argv``: a peer such as HAProxy) in a
    subprocess, the one helper every subprocess test uses.

    Its stderr is read by a thread into ``lines`` (a chatty server never blocks on a full
    pipe), so readiness is a wait on a log line: ``wait_line`` (a substring), ``wait_log`` (a
    regex), ``wait_endpoints``. The start waits for ``ready`` "listening on" lines (0: no
    wait) and keeps their URLs in ``endpoints``. ``tests/`` is put on ``PYTHONPATH`` so
    handlers in ``fault_services``/``deploy_helpers`` load by ``module:attr``.

    Resource handling: leaving the ``with`` block kills the process (SIGKILL), or with
    ``graceful=True`` sends SIGTERM and kills only what is still running after 15 s (a
    supervisor then reaps its workers).
    """

    def __init__(
        self,
        *args: str,
        argv: Sequence[str] | None = None,
        prefix: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready: int = 1,
        start_timeout: float = 15.0,
        graceful: bool = False,
        cwd: str | os.PathLike[str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        if argv is None:
            argv = [*(prefix or SOCKSERVE), "serve", *args]
        elif args or prefix:
            raise TypeError("ServerProcess: give either argv or serve arguments, not both")
        pythonpath = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))
        self.graceful = graceful
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
            cwd=cwd,
            pass_fds=pass_fds,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="server-stderr", daemon=True)
        self._reader.start()
        self.endpoints: list[str] = []
        if ready:
            try:
                self.endpoints = self.wait_endpoints(ready, start_timeout)
            except AssertionError as e:
                self.kill()
                raise AssertionError(f"server did not start: {' '.join(argv)}\n{e}") from None

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._cond:
                self.lines.append(raw.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def log(self) -> str:
        """Everything logged so far."""
        with self._cond:
            return "".join(self.lines)

    def count(self, text: str) -> int:
        """How many log lines contain ``text`` so far."""
        with self._cond:
            return sum(text in line for line in self.lines)

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 15.0) -> list[re.Match[str]]:
        """Wait until ``pattern`` (a regex) matched ``count`` log lines; return the matches.
        Fails naming the pattern and showing the log on timeout, or once the process has
        exited without it."""
        return self._wait(re.compile(pattern), count, timeout, f"matching {pattern!r}")

    def wait_line(self, text: str, count: int = 1, timeout: float = 15.0) -> str:
        """Wait until ``count`` log lines contain ``text``; return the last of them."""
        found = self._wait(re.compile(re.escape(text)), count, timeout, f"with {text!r}")
        return found[count - 1].string

    def _wait(
        self, rx: re.Pattern[str], count: int, timeout: float, what: str
    ) -> list[re.Match[str]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for line in self.lines if (m := rx.search(line))]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"no {count} log line(s) {what} (exit status {self.proc.poll()}); log:\n"
                        + "".join(self.lines)
                    )
                self._cond.wait(min(left, 0.1))

    def wait_endpoints(self, count: int, timeout: float = 15.0) -> list[str]:
        """The URLs of the first ``count`` "listening on" lines, waiting for them."""
        found = self.wait_log(r"listening on (\S+)", count, timeout)
        return [m.group(1) for m in found[:count]]

    def url(self, scheme: str, timeout: float = 15.0) -> str:
        """The first endpoint of ``scheme`` the server listens on (waits for its line)."""
        return self.wait_log(rf"listening on ({re.escape(scheme)}://\S+)", 1, timeout)[0].group(1)

    def addr(self, scheme: str) -> tuple[str, int]:
        return addr_of(self.url(scheme))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> tuple[int, str]:
        """Wait for exit; return (exit status, everything it logged). Kills it and fails with
        the log if it is still running after ``timeout``."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"server did not exit within {timeout}s; log:\n{self.log}"
            ) from None
        self._reader.join(5)
        return rc, self.log

    def stop(self, timeout: float = 15.0) -> tuple[int, str]:
        """SIGTERM, then SIGKILL if still running after ``timeout``; (exit status, log)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)
        return self.proc.wait(5), self.log

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.graceful:
            self.stop()
        else:
            self.kill()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def addr_of(where: str | Endpoint) -> tuple[str, int]:
    """(host, port) of an inet endpoint (or its URL), typed as ``socket.connect`` wants it:
    ``Endpoint.address()`` may also be a Unix path."""
    from sockserve.endpoints import parse_endpoint

    ep = parse_endpoint(where) if isinstance(where, str) else where
    if not ep.is_inet:
        raise ValueError(f"addr_of: {ep.url()} is not an inet endpoint")
    return ep.host, ep.port


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until true or fail after ``timeout`` (a readiness wait, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def recv_all(s: socket.socket) -> bytes:
    """Read until EOF (the socket's timeout bounds each recv)."""
    chunks: list[bytes] = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
