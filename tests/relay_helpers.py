"""Textbook peers for the relay tests: a server that accepts one connection and runs a
script on it in a thread, and a relay started in the test's process."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OnePeer:
    """A textbook server (the ``socket`` module only): listen, accept one connection and
    run ``script(conn)`` on it in a thread; :meth:`result` returns what the script returned
    (or raises what it raised)."""

    def __init__(
        self,
        script: Callable[[socket.socket], Any],
        where: str | Path = "127.0.0.1",
        timeout: float = 10.0,
    ) -> None:
        if isinstance(where, Path):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(str(where))
            self.url = f"unix://{where}"
        else:
            family = socket.AF_INET6 if ":" in where else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.bind((where, 0))
            port = self.sock.getsockname()[1]
            self.url = f"tcp://[{where}]:{port}" if ":" in where else f"tcp://{where}:{port}"
        self.sock.listen(8)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self._script = script
        self._result: Any = None
        self._error: BaseException | None = None
        self.conn: socket.socket | None = None
        self.accepted = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(self.timeout)
            self.conn = conn
            self.accepted.set()
            with conn:
                self._result = self._script(conn)
        except BaseException as exc:  # handed to the test by result()
            self._error = exc
        finally:
            self.sock.close()

    def result(self, timeout: float = 15.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the peer's script did not finish"
        if self._error is not None:
            raise self._error
        return self._result


def read_to_eof(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def reset_close(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed peer or a firewall would end it."""
    import struct

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    """A blocking client socket connected to ``url`` (tcp:// or unix://)."""
    from sockserve.endpoints import parse_endpoint

    ep = parse_endpoint(url)
    if ep.is_unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(ep.path)
        return s
    return socket.create_connection((ep.host, ep.port), timeout=timeout)
