"""Helpers for the fault-injection, access, TLS and shutdown tests.

- :class:`LoggedServer`: ``sockserve serve`` in a subprocess whose stderr is read by a
  thread (so a chatty server never blocks on a full pipe) and can be waited on line by line.
- :func:`make_certs`: a throwaway PKI made with the ``openssl`` CLI.
- :func:`assert_alive`: the "after each fault, a new client is answered" check.
- Raw-socket helpers: reset (RST) a connection, read until the peer closes.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sockserve
from sockserve.server import ServerThread

SOCKSERVE = [sys.executable, "-m", "sockserve"]
TESTS_DIR = Path(__file__).resolve().parent

#: Runs the CLI under a lowered RLIMIT_NOFILE: ``python -c WRAPPER LIMIT serve ...``.
RLIMIT_WRAPPER = (
    "import resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "from sockserve.cli.main import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


class LoggedServer:
    """``sockserve serve ARGS`` in a subprocess; every stderr line is kept in ``lines``."""

    def __init__(
        self,
        *args: str,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
        ready: int = 1,
        start_timeout: float = 15.0,
    ) -> None:
        argv = [*prefix, "serve", *args] if prefix else [*SOCKSERVE, "serve", *args]
        pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="server-stderr", daemon=True)
        self._reader.start()
        try:
            self.wait_line("listening on ", count=ready, timeout=start_timeout)
        except AssertionError:
            self.kill()
            raise
        self.endpoints = [
            line.split("listening on ", 1)[1].split(" ", 1)[0]
            for line in self.lines
            if "listening on " in line
        ]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._cond:
                self.lines.append(raw.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def count(self, text: str) -> int:
        with self._cond:
            return sum(text in line for line in self.lines)

    def wait_line(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``count`` log lines contain ``text``; fail naming it and showing the log."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(text in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"server log never had {count} line(s) with {text!r}; log:\n" + self.log
                    )
                self._cond.wait(min(left, 0.1))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def url(self, scheme: str) -> str:
        return next(u for u in self.endpoints if u.startswith(scheme + "://"))

    def addr(self, scheme: str) -> tuple[str, int]:
        ep = sockserve.parse_endpoint(self.url(scheme))
        return ep.host, ep.port

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> tuple[int, str]:
        """Wait for exit; return (exit status, everything it logged)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"server did not exit within {timeout}s; log:\n{self.log}"
            ) from None
        self._reader.join(5)
        return rc, self.log

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> LoggedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


# -- the liveness check that ends every fault test ----------------------------------------


def assert_alive(url: str, framing: str = "raw", payload: bytes = b"still there?") -> None:
    """A brand-new client gets an answer from ``url`` (timestamp-style: reply ends with it)."""
    with sockserve.connect(url, framing=framing, timeout=5) as c:
        reply = c.request(payload)
    assert reply.endswith(payload) or reply in (payload.upper(), b"ok " + payload), (
        f"{url}: unexpected reply {reply!r} after the fault"
    )


def assert_thread_alive(st: ServerThread, scheme: str = "tcp", framing: str = "raw") -> None:
    assert st.server.loop.is_running(), "server loop stopped"
    assert_alive(st.url(scheme), framing)


# -- raw sockets ------------------------------------------------------------------------


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Read (discarding) until the peer closes or resets; False if it stays open past timeout."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def addr_of(url: str) -> tuple[str, int]:
    ep = sockserve.parse_endpoint(url)
    return ep.host, ep.port


# -- a throwaway PKI ----------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: str  # CA certificate that signed the server and the good client
    server_cert: str
    server_key: str
    client_cert: str  # signed by ``ca``
    client_key: str
    rogue_cert: str  # a client certificate signed by another CA
    rogue_key: str


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {proc.stderr.decode()}")


def _new_ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN=sockserve test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )


def _new_leaf(d: Path, name: str, ca: str, cn: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n" + ext
    )
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        cwd=d,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )


def make_certs(d: Path) -> Certs:
    """A CA, a server cert for 127.0.0.1/::1/localhost, a client cert, and a rogue client cert."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl CLI is needed to make test certificates")
    _new_ca(d, "ca")
    _new_ca(d, "rogue-ca")
    _new_leaf(
        d,
        "server",
        "ca",
        "localhost",
        "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _new_leaf(d, "client", "ca", "good client", "extendedKeyUsage=clientAuth\n")
    _new_leaf(d, "rogue", "rogue-ca", "rogue client", "extendedKeyUsage=clientAuth\n")
    return Certs(
        ca=str(d / "ca.pem"),
        server_cert=str(d / "server.pem"),
        server_key=str(d / "server.key"),
        client_cert=str(d / "client.pem"),
        client_key=str(d / "client.key"),
        rogue_cert=str(d / "rogue.pem"),
        rogue_key=str(d / "rogue.key"),
    )


# -- capturing the server's log in-process ------------------------------------------------


class LogTap(logging.Handler):
    """Collects every record of the ``sockserve`` loggers (thread-safe, waitable)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def messages(self) -> list[str]:
        with self._cond:
            return [r.getMessage() for r in self.records]

    def count(self, text: str) -> int:
        return sum(text in m for m in self.messages())

    def wait_for(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(text in r.getMessage() for r in self.records) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"server log never had {count} record(s) with {text!r}; log:\n"
                        + "\n".join(r.getMessage() for r in self.records)
                    )
                self._cond.wait(left)

    def errors(self) -> list[str]:
        """Records at ERROR or above (a fault that only concerns one client is never one)."""
        with self._cond:
            return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]
