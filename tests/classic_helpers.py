"""Helpers for the classic-service tests: socket plumbing and independent RFC references.

The references here are written from the RFC text, not imported from the
services, so a test comparing the two can fail when the service is wrong.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from pathlib import Path
from typing import Any

from sockserve._engine.stream import SessionProtocol
from sockserve.endpoints import Endpoint
from sockserve.server import ServerThread

TIMEOUT = 5.0
#: RFC 868: seconds from 1900-01-01 to 1970-01-01.
RFC868_OFFSET = 2208988800
ALL_BYTES_MIB = bytes(range(256)) * 4096  # 1 MiB holding every byte value
#: ctime(3) cut to 24 characters plus CRLF: what BSD inetd's daytime sends.
DAYTIME = re.compile(
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    rb"[ 123]\d \d\d:\d\d:\d\d \d{4}\r\n"
)


def chargen_reference(nbytes: int, first_line: int = 0) -> bytes:
    """RFC 864: 72-character lines from the ring of the 95 printable characters, line N
    starting N places further on, each ended by CRLF."""
    out = bytearray()
    n = first_line
    while len(out) < nbytes:
        out += bytes(0x20 + (n + i) % 95 for i in range(72)) + b"\r\n"
        n += 1
    return bytes(out[:nbytes])


def family(ep: Endpoint) -> socket.AddressFamily:
    if ep.is_unix:
        return socket.AF_UNIX
    return socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET


def connect(ep: Endpoint, timeout: float = TIMEOUT) -> socket.socket:
    s = socket.socket(family(ep), socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(ep.address())
    return s


def read_until_eof(s: socket.socket, limit: int = 64 << 20) -> bytes:
    """Everything up to EOF; each recv is bounded by the socket's timeout."""
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = s.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    raise AssertionError(f"no EOF after {total} bytes")


def read_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def stream_through(s: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` from a thread while reading here (so neither side's buffers
    fill and deadlock), half-close, and return what came back before EOF."""
    errors: list[BaseException] = []

    def send() -> None:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        data = read_until_eof(s, limit=len(payload) + 1)
    finally:
        t.join(TIMEOUT)
    if errors:
        raise errors[0]
    return data


def datagram(
    ep: Endpoint, payload: bytes, tmp: Path | None = None, bind: Any = None
) -> socket.socket:
    """A datagram socket that has sent ``payload`` to ``ep`` (Unix clients bind a path
    in ``tmp`` so the server can answer)."""
    s = socket.socket(family(ep), socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    if ep.is_unix:
        assert tmp is not None
        s.bind(str(tmp / f"client-{id(s)}.sock"))
    elif bind is not None:
        s.bind(bind)
    s.sendto(payload, ep.address())
    return s


def udp_ask(ep: Endpoint, payload: bytes, tmp: Path | None = None, bind: Any = None) -> bytes:
    with datagram(ep, payload, tmp, bind) as s:
        return s.recv(65536)


def endpoint(st: ServerThread, scheme: str) -> Endpoint:
    return next(ep for ep in st.endpoints if ep.scheme == scheme)


def on_server_loop(st: ServerThread, fn: Any) -> Any:
    """Run ``fn()`` on the server's event loop thread and return its result, so the
    test reads engine state without racing the loop."""

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), st.server.loop).result(TIMEOUT)


def session_buffers(st: ServerThread) -> list[tuple[int, bool]]:
    """(bytes in the write buffer, writable) for each stream-session connection, read
    on the server's loop: the in-process view of what a slow reader costs the server."""

    def probe() -> list[tuple[int, bool]]:
        out = []
        for rt in st.server.streams:
            for conn in rt.conns:
                if isinstance(conn, SessionProtocol) and conn._transport is not None:
                    out.append((conn._transport.get_write_buffer_size(), conn.writable))
        return out

    result: list[tuple[int, bool]] = on_server_loop(st, probe)
    return result
