"""How the ``--workers`` of one ``serve`` share each endpoint (the supervisor's sockets).

Each worker binds its own ``SO_REUSEPORT`` socket for TCP/UDP endpoints, so
the kernel spreads connections over the workers' accept queues. The parent
binds instead, and the workers inherit the socket, for Unix endpoints, for UDP
port 0, and where ``SO_REUSEPORT`` is missing. For TCP port 0 the parent
reserves a port (a bound, never-listening ``SO_REUSEPORT`` socket) so every
worker, and every restarted one, binds the same port. Sockets systemd passed in
are handed on as they are.

Resource handling: :meth:`SharedSockets.close` closes what the parent opened; a
socket that fails to open raises (EndpointError, OSError) before any worker starts.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..server.listeners import Listener, _resolve, close_listener, open_listener

if TYPE_CHECKING:
    from ..endpoints import Endpoint
    from .app import Unit

HAS_REUSEPORT = hasattr(socket, "SO_REUSEPORT")


@dataclass
class SharedSockets:
    """What the parent opened for its workers, by configured URL."""

    listeners: list[Listener] = field(default_factory=list)  # bound here, inherited
    reserved: list[socket.socket] = field(default_factory=list)  # holding a port 0's port
    prebound: dict[str, int] = field(default_factory=dict)  # URL -> fd the workers inherit
    ports: dict[str, int] = field(default_factory=dict)  # URL -> port the workers bind

    @classmethod
    def prepare(cls, units: Iterable[Unit]) -> SharedSockets:
        """Bind or reserve, for each unit, what its workers cannot bind on their own."""
        shared = cls()
        try:
            for unit in units:
                shared._prepare(unit)
        except BaseException:
            shared.close()
            raise
        return shared

    def _prepare(self, unit: Unit) -> None:
        ep, url = unit.key, unit.key.url()
        if unit.listener is not None:
            return  # from systemd: passed on as it is
        if ep.is_unix or not HAS_REUSEPORT or (ep.port == 0 and not ep.is_stream):
            lst = open_listener(ep, backlog=unit.config.backlog, unix_mode=unit.config.unix_mode)
            self.listeners.append(lst)
            self.prebound[url] = lst.sock.fileno()
        elif ep.port == 0:
            self.ports[url] = self._reserve_port(ep)

    def _reserve_port(self, ep: Endpoint) -> int:
        family, addr = _resolve(ep)
        sock = socket.socket(family, socket.SOCK_STREAM)
        self.reserved.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        return int(sock.getsockname()[1])

    def close(self) -> None:
        for lst in self.listeners:
            close_listener(lst)
        for sock in self.reserved:
            sock.close()
