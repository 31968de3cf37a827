"""Datagram relaying (``udp://``, ``unixgram://``): each source address is a flow.

A flow is the relay's own socket connected to TARGET, opened for a source's first
datagram: the target sees one peer per client, and what it sends back on that socket
goes to that client alone. Datagrams cross unchanged both ways (boundaries kept, the
empty one too, up to :data:`MAX_DATAGRAM` bytes; a longer unixgram one is dropped and
counted, never cut). Towards a ``unixgram://`` target the flow's socket is autobound
(a kernel-chosen abstract name, Linux) so the target has an address to reply to.

Why not asyncio's ``DatagramProtocol``: it reads one datagram per callback, and queues
without bound when a send would block. The listening socket is read in batches with
``recvmmsg`` and replies go out with ``sendmmsg``, through the server's own helpers
(``_engine/fastio``); a full socket buffer drops and counts, as UDP does. Each socket is
a plain ``add_reader`` of the event loop (asyncio or uvloop): the epoll hub's gains are
its fast path and busy-poll for request/reply, which a relay's flows cannot use.

Limits: a flow ends after ``flow_timeout`` seconds without a datagram either way (a
sweep every second, or a quarter of the timeout, closes them). Open flows are capped
(``max_conns``, else :func:`default_max_flows`): past it a new source's datagrams are
refused, logged once, so a flood of new sources never evicts a client mid-conversation
(as ``serve --max-conns`` stops accepting rather than dropping the open ones). The
serve's UDP guards judge each source (``--allow``/``--deny``, privileged and service
source ports, ``--udp-rate``, the loop budget). The amplification cap does not apply:
a relay passes the target's datagrams unchanged.

Error handling: ECONNREFUSED on a flow (an ICMP port-unreachable from the target, no
unixgram socket at its path) is counted in ``counts.refused`` and logged once per flow;
the flow stays, nothing else is touched. Another error on one flow's socket closes that
flow, logged. An error of the listening socket itself stops the relay, logged at error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import random
import resource
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._engine.fastio import BATCH, batch_io
from .._engine.guards import LOOP, PRIVILEGED, SERVICE_PORT, UdpGuard, ephemeral_ports
from ..config import ServerConfig
from ..endpoints import Endpoint
from ..errors import ConfigError, EndpointError
from ..logs import conn_log, fmt_peer, server_log, trace
from ..server.listeners import Listener, adopt_socket
from ..settings import default
from .pipes import DatagramPipe
from .session import RelayStats

if TYPE_CHECKING:
    from .toxics import ToxicSet

#: Largest datagram relayed (a UDP payload is at most 65,507 bytes over IPv4 anyway).
MAX_DATAGRAM = 65536
#: Idle seconds before a flow ends, unless ``idle_timeout`` is set: between conntrack's
#: 30 s for an unanswered UDP flow and its 120 s for an answered one (socat has none).
DEFAULT_FLOW_TIMEOUT = 60.0
#: Datagrams read from one socket per wakeup before yielding to the loop.
RECV_BATCH = 4 * BATCH
_SOCKET_LOST = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EFAULT})
_FULL = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)


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


class HasEndpoint(Protocol):
    """A parsed TARGET (``relay.target.Target``): its endpoint, None for ``exec:``."""

    @property
    def endpoint(self) -> Endpoint | None: ...


@dataclass
class DatagramStats:
    """Counters beside the relay's :class:`RelayStats` (flows opened and open, bytes each
    way, errors by kind, toxics applied)."""

    datagrams_up: int = 0
    datagrams_down: int = 0
    #: Not relayed: the guards, the flow cap, a full buffer, too long, no return address.
    dropped: int = 0
    #: ECONNREFUSED from the target (ICMP port unreachable; no unixgram socket there).
    refused: int = 0


class _Flow:
    __slots__ = ("addr", "down", "fd", "last", "refused", "sock", "up")

    def __init__(self, sock: socket.socket, addr: Any, now: float) -> None:
        self.sock, self.fd, self.addr, self.last = sock, sock.fileno(), addr, now
        self.refused = 0
        self.up: DatagramPipe | None = None  # client -> target, once there are toxics
        self.down: DatagramPipe | None = None


class DatagramRelay:
    """Relays every datagram flow of one bound datagram socket to one datagram TARGET.

    ``listener`` is a bound ``udp://``/``unixgram://`` :class:`Listener` or its socket; it
    stays the caller's to close. ``toxics`` (a live ToxicSet): while it holds any, each
    flow has an upstream and a downstream ``DatagramPipe`` (toxicity drawn per flow);
    toxics added later reach open flows too. ``flow_timeout``: idle seconds (None: never),
    by default :func:`flow_timeout_of` the config.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: Listener | socket.socket,
        target: Endpoint | HasEndpoint,
        toxics: ToxicSet | None = None,
        config: ServerConfig | None = None,
        stats: RelayStats | None = None,
        *,
        flow_timeout: float | str | None = "config",
        rng: random.Random | None = None,
    ) -> None:
        self.loop = loop
        self.listener = listener if isinstance(listener, Listener) else adopt_socket(listener)
        self.endpoint = lst = self.listener.endpoint
        ep = target if isinstance(target, Endpoint) else target.endpoint
        if lst.is_stream or ep is None or ep.is_stream:
            raise ConfigError(
                f"LISTEN {lst} and TARGET {ep or target}: a datagram relay joins a udp:// or "
                "unixgram:// LISTEN to a udp:// or unixgram:// TARGET"
            )
        self.target = ep
        self.config = config = config or ServerConfig()
        timeout = flow_timeout_of(config) if flow_timeout == "config" else flow_timeout
        if isinstance(timeout, str) or (timeout is not None and not timeout > 0):
            raise ConfigError(f"flow timeout must be positive seconds, got {flow_timeout!r}")
        self.flow_timeout = timeout
        self.toxics = toxics
        if toxics is not None:
            toxics.restrict("datagram")  # ToxicError (a ConfigError) for a stream-only toxic
        self.stats = stats if stats is not None else RelayStats()
        self.counts = DatagramStats()
        self.max_flows = config.max_conns or default_max_flows()
        self.rng = rng
        self.flows: dict[Any, _Flow] = {}
        self._sock = sock = self.listener.sock
        self._udp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._io = batch_io(sock)
        self.guard = UdpGuard(config, inet=self._udp, host=lst.host, replies_larger=False)
        self._trace = config.trace
        self._reading = False
        self._timers: list[asyncio.TimerHandle] = []
        self._unwatch: Any = None
        self._full_logged = False
        self._family: int = socket.AF_UNIX
        self._target_addr: Any = ep.address()

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        """Resolve TARGET (EndpointError naming it if it cannot be) and start reading."""
        if self.target.is_inet:
            self._family, self._target_addr = _resolve(self.target)
        if self._udp:
            self.guard.serving([self.endpoint.port])  # our own port is never a client's
        if self.toxics is not None:
            self._unwatch = self.toxics.watch(self._toxics_changed)
        self.loop.add_reader(self._sock.fileno(), self._readable)
        self._reading = True
        if self.flow_timeout is not None:
            self._timers.append(self.loop.call_later(self._sweep_every(), self._sweep))

    def close(self) -> None:
        """Stop reading and end every flow (the listener itself stays the caller's)."""
        if self._reading:
            self._reading = False
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(self._sock.fileno())
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        for flow in list(self.flows.values()):
            self._end(flow, "the relay stopped")

    @property
    def applied(self) -> dict[str, int]:
        """Toxic type -> times applied, over every flow closed or open."""
        total = dict(self.stats.toxics)
        for flow in self.flows.values():
            for pipe in (flow.up, flow.down):
                for kind, n in pipe.applied.items() if pipe is not None else ():
                    total[kind] = total.get(kind, 0) + n
        return total

    # -- client -> target --------------------------------------------------------------

    def _readable(self) -> None:
        target, recv, _ = self._io
        for _ in range(RECV_BATCH // BATCH):
            if not self._reading:
                return
            try:
                if self._udp:
                    batch = recv(target, BATCH, MAX_DATAGRAM)
                else:
                    batch = _recv_unix(self._sock, BATCH, self.counts)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _SOCKET_LOST:
                    self._lost(exc)
                    return
                server_log.debug("%s: recvfrom: %s", self.endpoint, exc)
                continue
            self._upstream(batch)
            if len(batch) < BATCH:
                return

    def _upstream(self, batch: list[tuple[bytes, Any]]) -> None:
        stats, counts, flows, guard = self.stats, self.counts, self.flows, self.guard
        now = self.loop.time()
        udp, min_port, own, loop_guard = (
            self._udp,
            guard.min_port,
            guard.own_ports,
            guard.loop_guard,
        )
        slow = guard.access.active or guard.rate > 0
        eph_lo, eph_hi = ephemeral_ports()
        for data, addr in batch:
            if udp:
                port = addr[1]
                if (
                    port < min_port
                    or port in own
                    or slow
                    or (loop_guard and not eph_lo <= port <= eph_hi)
                ) and not self._admit(addr, now):
                    continue
            flow = flows.get(addr)
            if flow is None:
                flow = self._open(addr, now)
                if flow is None:
                    counts.dropped += 1
                    continue
            flow.last = now
            counts.datagrams_up += 1
            stats.bytes_up += len(data)
            if self._trace:
                trace(self.endpoint, addr, "relayed to target from", data)
            pipe = flow.up
            if pipe is not None and not pipe.passthrough:
                pipe.feed(data)
            else:
                self._send_up(flow, data)

    def _send_up(self, flow: _Flow, data: bytes) -> None:
        for _ in range(2):  # a refusal reported now is an earlier datagram's: retry once
            try:
                flow.sock.send(data)
                return
            except ConnectionRefusedError:
                self._refused(flow)
            except OSError as exc:
                if exc.errno not in _FULL and not isinstance(exc, InterruptedError):
                    self._failed(flow, "send", exc)
                break
        self.counts.dropped += 1

    def _admit(self, addr: Any, now: float) -> bool:
        why = self.guard.admit(addr[0], addr[1], now, ephemeral_ports())
        if why is None:
            return True
        self.counts.dropped += 1
        message = _DROP_MESSAGES.get(why)
        if message is not None:
            conn_log.debug(message, self.endpoint, fmt_peer(addr))
        return False

    def _open(self, addr: Any, now: float) -> _Flow | None:
        """A new flow for ``addr``, or None (logged) past the cap or if TARGET refuses."""
        peer = fmt_peer(addr)
        if len(self.flows) >= self.max_flows:
            if self._full_logged:
                return None
            self._full_logged = True  # once: a flood must not flood the log too
            server_log.warning(
                "%s: %d flows open (the cap, --max-conns): datagrams from new sources such "
                "as %s are dropped until one ends (after %ss idle)",
                *(self.endpoint, len(self.flows), peer, self.flow_timeout),
                extra={"event": "flows_full", "endpoint": self.endpoint},
            )
            return None
        try:
            sock = self._connect()
        except OSError as exc:
            refused = isinstance(exc, (ConnectionRefusedError, FileNotFoundError))
            self.counts.refused += refused
            self.stats.error("target_refused" if refused else "flow_open")
            conn_log.info(
                "%s: flow from %s: cannot reach %s: %s",
                *(self.endpoint, peer, self.target, exc.strerror or exc),
                extra={"event": "connect_failed", "endpoint": self.endpoint, "peer": peer},
            )
            return None
        flow = self.flows[addr] = _Flow(sock, addr, now)
        if self.toxics is not None and len(self.toxics):
            self._pipe(flow)
        self.loop.add_reader(flow.fd, self._flow_readable, flow)
        self.stats.connections += 1
        self.stats.open = len(self.flows)
        conn_log.info(
            "%s: flow from %s to %s opened",
            *(self.endpoint, peer, self.target),
            extra={"event": "flow_open", "endpoint": self.endpoint, "peer": peer},
        )
        return flow

    def _connect(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self._family == socket.AF_UNIX:
                sock.bind("")  # autobind: an abstract name the target can reply to (Linux)
            sock.connect(self._target_addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def _pipe(self, flow: _Flow) -> None:
        """Put ``flow``'s datagrams through the toxics, each direction its own pipe."""
        assert self.toxics is not None
        up = functools.partial(self._send_up, flow)
        down = functools.partial(self._send_down, flow)
        flow.up = DatagramPipe(self.loop, self.toxics, "upstream", up, rng=self.rng)
        flow.down = DatagramPipe(self.loop, self.toxics, "downstream", down, rng=self.rng)

    def _toxics_changed(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to change
            self.loop.call_soon_threadsafe(self._retoxed)

    def _retoxed(self) -> None:
        """The toxics changed (the pipes follow it themselves): open flows without pipes
        get theirs, so a toxic added at run time reaches them."""
        if self.toxics is not None and len(self.toxics):
            for flow in self.flows.values():
                if flow.up is None:
                    self._pipe(flow)

    # -- target -> client --------------------------------------------------------------

    def _flow_readable(self, flow: _Flow) -> None:
        if self.flows.get(flow.addr) is not flow:
            return
        recv, counts = flow.sock.recv, self.counts
        replies: list[bytes] = []
        size = 0
        for _ in range(RECV_BATCH):
            try:
                data = recv(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self._refused(flow)
                continue
            except OSError as exc:
                self._failed(flow, "recv", exc)
                return
            if len(data) > MAX_DATAGRAM:
                counts.dropped += 1
                continue
            size += len(data)
            replies.append(data)
        if not replies:
            return
        flow.last = self.loop.time()
        counts.datagrams_down += len(replies)
        self.stats.bytes_down += size
        if self._trace:
            for data in replies:
                trace(self.endpoint, flow.addr, "relayed from target to", data)
        pipe = flow.down
        if pipe is not None and not pipe.passthrough:
            for data in replies:
                pipe.feed(data)
        elif len(replies) > 1 and self._udp:
            self._send_batch(flow, replies)
        else:
            for data in replies:
                self._send_down(flow, data)

    def _send_down(self, flow: _Flow, data: bytes) -> None:
        if flow.addr is None:  # an unbound unixgram client: no address to reply to
            self.counts.dropped += 1
            return
        try:
            self._sock.sendto(data, flow.addr)
        except OSError as exc:
            self._send_down_failed(flow, exc.errno or errno.EIO)

    def _send_batch(self, flow: _Flow, replies: list[bytes]) -> None:
        target, _, send = self._io
        failed = send(target, [(data, flow.addr) for data in replies])
        for _, err in failed or ():
            self._send_down_failed(flow, err)

    def _send_down_failed(self, flow: _Flow, err: int) -> None:
        self.counts.dropped += 1
        if err not in _FULL:
            self.stats.error("send")
            conn_log.info(
                "%s: sendto %s failed: %s", self.endpoint, fmt_peer(flow.addr), os.strerror(err)
            )

    # -- trouble, and the end of flows -------------------------------------------------

    def _refused(self, flow: _Flow) -> None:
        self.counts.refused += 1
        self.stats.error("target_refused")
        flow.refused += 1
        (conn_log.info if flow.refused == 1 else conn_log.debug)(
            "%s: flow from %s: %s refused a datagram (port unreachable); the flow stays",
            *(self.endpoint, fmt_peer(flow.addr), self.target),
            extra={"event": "target_refused", "endpoint": self.endpoint},
        )

    def _failed(self, flow: _Flow, what: str, exc: OSError) -> None:
        self.stats.error(what)
        self._end(flow, f"{what} towards {self.target} failed: {exc.strerror or exc}")

    def _end(self, flow: _Flow, why: str) -> None:
        if self.flows.get(flow.addr) is flow:
            del self.flows[flow.addr]
        with contextlib.suppress(OSError, ValueError):
            self.loop.remove_reader(flow.fd)
        flow.sock.close()
        applied = self.stats.toxics
        for pipe in (flow.up, flow.down):
            if pipe is not None:
                pipe.close()
                for kind, n in pipe.applied.items():
                    applied[kind] = applied.get(kind, 0) + n
        self.stats.open = len(self.flows)
        peer = fmt_peer(flow.addr)
        conn_log.info(
            "%s: flow from %s closed: %s",
            *(self.endpoint, peer, why),
            extra={"event": "flow_close", "endpoint": self.endpoint, "peer": peer},
        )

    def _sweep_every(self) -> float:
        return min(1.0, (self.flow_timeout or 4.0) / 4)

    def _sweep(self) -> None:
        assert self.flow_timeout is not None
        deadline = self.loop.time() - self.flow_timeout
        for flow in [f for f in self.flows.values() if f.last <= deadline]:
            self._end(flow, f"idle for {self.flow_timeout:g}s")
        self._timers[:] = [self.loop.call_later(self._sweep_every(), self._sweep)]

    def _lost(self, exc: OSError) -> None:
        server_log.error(
            "%s: datagram relay stopped: its socket failed: %s",
            *(self.endpoint, exc.strerror or exc),
            extra={"event": "endpoint_lost", "endpoint": self.endpoint},
        )
        self.close()


def _recv_unix(sock: socket.socket, count: int, counts: DatagramStats) -> list[tuple[bytes, Any]]:
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


def _resolve(ep: Endpoint) -> tuple[int, Any]:
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise EndpointError(f"TARGET {ep}: cannot resolve {ep.host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


#: The debug line for a dropped datagram, by the guard's reason (denied and rate: none).
_DROP_MESSAGES = {
    PRIVILEGED: "%s: dropped datagram from privileged port %s",
    SERVICE_PORT: "%s: dropped datagram from %s: a service's port (relaying could start a loop)",
    LOOP: "%s: dropped datagram from %s: over the loop budget of a fixed source port",
}
