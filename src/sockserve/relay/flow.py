"""One datagram flow (a source's own socket connected to TARGET) and the numbers that bound
flows: their size, idle timeout and count. :mod:`.flows` runs them; this module holds what
needs no event loop, so it reads (and is tested) on its own.

Resource handling: a flow owns its socket and its pipes; :meth:`Flow.close` releases both
and hands back what its toxics did, for the relay's totals.
"""

from __future__ import annotations

import resource
import socket
from dataclasses import dataclass
from typing import Any

from .._engine.fastio import BATCH
from ..config import ServerConfig
from ..endpoints import Endpoint
from ..errors import EndpointError
from ..settings import default
from .pipes import DatagramPipe

#: Largest datagram relayed (a UDP payload is at most 65,507 bytes over IPv4 anyway).
MAX_DATAGRAM = 65536
#: Idle seconds before a flow ends, unless ``idle_timeout`` is set: between conntrack's
#: 30 s for an unanswered UDP flow and its 120 s for an answered one (socat has none).
DEFAULT_FLOW_TIMEOUT = 60.0
#: Datagrams read from one socket per wakeup before yielding to the loop.
RECV_BATCH = 4 * BATCH


def default_max_flows() -> int:
    """Open flows without ``max_conns``: 4096, or half the descriptor limit if lower
    (each flow holds one; the rest stay for everything else)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 4096 if soft == resource.RLIM_INFINITY else max(16, min(4096, soft // 2))


def flow_timeout_of(config: ServerConfig) -> float | None:
    """``idle_timeout`` for flows: as set (None = never), but serve's default of 300 s,
    meant for connections, reads as :data:`DEFAULT_FLOW_TIMEOUT`."""
    if config.idle_timeout == default("idle_timeout"):
        return DEFAULT_FLOW_TIMEOUT
    return config.idle_timeout


@dataclass
class DatagramStats:
    """Beside the relay's ``RelayStats`` (flows opened, open; bytes each way; errors; toxics)."""

    datagrams_up: int = 0
    datagrams_down: int = 0
    #: Not relayed: the guards, the flow cap, a full buffer, too long, no return address.
    dropped: int = 0
    #: ECONNREFUSED from the target (ICMP port unreachable; no unixgram socket there).
    refused: int = 0


class Flow:
    """One source's flow: its socket connected to TARGET, its pipes while toxics apply."""

    __slots__ = ("addr", "down", "fd", "last", "refused", "sock", "up")

    def __init__(self, sock: socket.socket, addr: Any, now: float) -> None:
        self.sock, self.fd, self.addr, self.last = sock, sock.fileno(), addr, now
        self.refused = 0  # ECONNREFUSED seen (the first is logged)
        self.up: DatagramPipe | None = None  # client -> target
        self.down: DatagramPipe | None = None

    @classmethod
    def connect(cls, family: int, target: Any, addr: Any, now: float) -> Flow:
        """A flow for source ``addr``: a non-blocking socket connected to ``target`` (an
        address of ``family``); OSError (the socket closed) if it cannot be."""
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if family == socket.AF_UNIX:
                sock.bind("")  # autobind: an abstract name the target can reply to (Linux)
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        return cls(sock, addr, now)

    def close(self, applied: dict[str, int]) -> None:
        """Close the socket and the pipes, adding what the toxics did to ``applied``."""
        self.sock.close()
        for pipe in (self.up, self.down):
            if pipe is not None:
                pipe.close()
                for kind, n in pipe.applied.items():
                    applied[kind] = applied.get(kind, 0) + n


def recv_unix(sock: socket.socket, count: int, counts: DatagramStats) -> list[tuple[bytes, Any]]:
    """Up to ``count`` datagrams of a unixgram socket (raises if none waits); one over
    MAX_DATAGRAM is dropped whole, never cut."""
    batch: list[tuple[bytes, Any]] = []
    for _ in range(count):
        try:
            data, addr = sock.recvfrom(MAX_DATAGRAM + 1)
        except (BlockingIOError, InterruptedError):
            if batch:
                break
            raise
        if len(data) > MAX_DATAGRAM:
            counts.dropped += 1
        else:
            batch.append((data, addr))
    return batch


def resolve(ep: Endpoint) -> tuple[int, Any]:
    """The family and socket address of an inet TARGET; EndpointError naming it if none."""
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise EndpointError(f"TARGET {ep}: cannot resolve {ep.host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr
