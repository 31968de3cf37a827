"""Test helpers: the CLI as a subprocess, server subprocesses, readiness waits, socket reads."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable

SOCKSERVE = [sys.executable, "-m", "sockserve"]

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
    """``sockserve serve`` in a subprocess; ``endpoints`` parsed from its 'listening on' lines."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready: int = 1) -> None:
        self.proc = subprocess.Popen(
            [*SOCKSERVE, "serve", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self.endpoints: list[str] = []
        self._pending = b""
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), True)
        deadline = time.monotonic() + 15
        while len(self.endpoints) < ready:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError("server did not start:\n" + "".join(self.lines) + self._rest())
            line = self._readline(deadline)
            if line is None:
                continue
            self.lines.append(line)
            if "listening on " in line:
                self.endpoints.append(line.split("listening on ", 1)[1].split(" ", 1)[0])

    def _readline(self, deadline: float) -> str | None:
        """One line of the server's stderr, read unbuffered so select() stays truthful."""
        import select

        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while b"\n" not in self._pending:
            r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode(errors="replace") + "\n"

    def _rest(self) -> str:
        if self.proc.stderr is None:
            return ""
        try:
            return self.proc.stderr.read().decode(errors="replace")
        except Exception:
            return ""

    def url(self, scheme: str) -> str:
        return next(u for u in self.endpoints if u.startswith(scheme + "://"))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> tuple[int, str]:
        """Wait for exit; return (exit status, everything it logged)."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        rest = self._pending + err
        return self.proc.returncode, "".join(self.lines) + rest.decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``cond`` until true or fail after ``timeout`` (a readiness wait, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def recv_all(s: socket.socket) -> bytes:
    """Read until EOF (the socket's timeout bounds each recv)."""
    chunks = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
