"""Helpers for the fault-injection, access, TLS and shutdown tests (the subprocess server is
:class:`support.ServerProcess`).

- :class:`LogTap`: the server's log records in-process, waitable.
- :func:`make_certs`: a throwaway PKI made with the ``openssl`` CLI.
- :func:`assert_alive`: the "after each fault, a new client is answered" check.
- Raw-socket helpers: reset (RST) a connection, read until the peer closes.
"""

from __future__ import annotations

import logging
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sockserve
from sockserve.server import ServerThread

#: Runs the CLI under a lowered RLIMIT_NOFILE: ``python -c WRAPPER LIMIT serve ...``.
RLIMIT_WRAPPER = (
    "import resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "from sockserve.cli.main import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


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


#: A new P-256 key without a passphrase, for ``openssl req``.
NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _new_ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        *NEW_EC_KEY,
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
        *NEW_EC_KEY,
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
