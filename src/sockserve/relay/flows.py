"""Datagram relaying (``udp://``, ``unixgram://``): each source address is a flow.

A flow is the relay's own socket connected to TARGET, opened for a source's first
datagram: the target sees one peer per client, and what it sends back on that socket
goes to that client alone. Datagrams cross unchanged (boundaries kept, the empty one
too, up to :data:`MAX_DATAGRAM` bytes; a longer unixgram one is dropped, never cut).
Towards a ``unixgram://`` target a flow's socket is autobound (a kernel-chosen abstract
name, Linux) so the target has an address to reply to.

Why not asyncio's ``DatagramProtocol``: it reads one datagram per callback, and queues
without bound when a send would block. Here the listening socket is read in batches
(``recvmmsg``) and replies leave in batches (``sendmmsg``) through the server's helpers
(``_engine/fastio``); a full socket buffer drops and counts, as UDP does. Sockets are
plain ``add_reader``s of the loop (asyncio or uvloop): the epoll hub's gains are its
request/reply fast path and busy-poll, which flows cannot use.

Limits: a flow ends after ``flow_timeout`` idle seconds (no datagram either way; a sweep
every second, or a quarter of the timeout). Open flows are capped (``max_conns``, else
:func:`default_max_flows`): past it a new source's datagrams are dropped, logged once,
so a flood of new sources never evicts a client mid-conversation (as ``serve
--max-conns`` stops accepting rather than closing open connections). serve's UDP guards
judge each source (``--allow``/``--deny``, privileged and service source ports,
``--udp-rate``, the loop budget); not the amplification cap: a relay passes the
target's datagrams unchanged.

Error handling: ECONNREFUSED on a flow (ICMP port unreachable from the target; no
unixgram socket at its path) is counted in ``counts.refused`` and logged once per flow;
the flow stays. Another error on a flow's socket closes that flow, logged; one of the
listening socket itself stops the relay, logged at error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import random
import socket
from typing import TYPE_CHECKING, Any

from .._engine.fastio import BATCH, batch_io
from .._engine.guards import UdpGuard, ephemeral_ports
from ..config import ServerConfig
from ..endpoints import Endpoint
from ..errors import ConfigError
from ..logs import conn_log, fmt_peer, server_log, trace
from ..server.listeners import Listener, adopt_socket
from .flow import (
    MAX_DATAGRAM,
    RECV_BATCH,
    DatagramStats,
    Flow,
    default_max_flows,
    flow_timeout_of,
    recv_unix,
    resolve,
)
from .pipes import DatagramPipe
from .session import RelayStats
from .target import Target

if TYPE_CHECKING:
    from .toxics import ToxicSet

_SOCKET_LOST = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EFAULT})
_FULL = (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS)


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
        target: Endpoint | Target,
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
        self.flows: dict[Any, Flow] = {}
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
            self._family, self._target_addr = resolve(self.target)
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
                    batch = recv_unix(self._sock, BATCH, self.counts)
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
        udp, min_port, own = self._udp, guard.min_port, guard.own_ports
        slow, loop_guard = guard.access.active or guard.rate > 0, guard.loop_guard
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

    def _send_up(self, flow: Flow, data: bytes) -> None:
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
        conn_log.debug("%s: dropped a datagram from %s: %s", self.endpoint, fmt_peer(addr), why)
        return False

    def _open(self, addr: Any, now: float) -> Flow | None:
        """A new flow for ``addr``, or None (logged) past the cap or if TARGET refuses."""
        peer = fmt_peer(addr)
        if len(self.flows) >= self.max_flows:
            if self._full_logged:
                return None
            self._full_logged = True  # once: a flood must not flood the log too
            why = "%d flows open (the cap, --max-conns): new sources such as %s are dropped"
            self._log(server_log.warning, "flows_full", peer, why, (len(self.flows), peer))
            return None
        try:
            flow = Flow.connect(self._family, self._target_addr, addr, now)
        except OSError as exc:
            refused = isinstance(exc, (ConnectionRefusedError, FileNotFoundError))
            self.counts.refused += refused
            self.stats.error("target_refused" if refused else "flow_open")
            why = "flow from %s: cannot reach %s: %s"
            self._log(conn_log.info, "connect_failed", peer, why, (peer, self.target, exc))
            return None
        self.flows[addr] = flow
        if self.toxics is not None and len(self.toxics):
            self._pipe(flow)
        self.loop.add_reader(flow.fd, self._flow_readable, flow)
        self.stats.connections += 1
        self.stats.open = len(self.flows)
        self._log(conn_log.info, "flow_open", peer, "flow from %s to %s", (peer, self.target))
        return flow

    def _pipe(self, flow: Flow) -> None:
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

    def _flow_readable(self, flow: Flow) -> None:
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

    def _send_down(self, flow: Flow, data: bytes) -> None:
        if flow.addr is None:  # an unbound unixgram client: no address to reply to
            self.counts.dropped += 1
            return
        try:
            self._sock.sendto(data, flow.addr)
        except OSError as exc:
            self._send_down_failed(flow, exc.errno or errno.EIO)

    def _send_batch(self, flow: Flow, replies: list[bytes]) -> None:
        target, _, send = self._io
        failed = send(target, [(data, flow.addr) for data in replies])
        for _, err in failed or ():
            self._send_down_failed(flow, err)

    def _send_down_failed(self, flow: Flow, err: int) -> None:
        self.counts.dropped += 1
        if err not in _FULL:
            peer = fmt_peer(flow.addr)
            self._log(conn_log.info, "send_failed", peer, "sendto %s: %s", (peer, os.strerror(err)))

    # -- trouble, and the end of flows -------------------------------------------------

    def _refused(self, flow: Flow) -> None:
        self.counts.refused += 1
        self.stats.error("target_refused")
        flow.refused += 1
        peer = fmt_peer(flow.addr)
        log = conn_log.info if flow.refused == 1 else conn_log.debug
        why = "flow from %s: %s refused a datagram (port unreachable); the flow stays"
        self._log(log, "target_refused", peer, why, (peer, self.target))

    def _failed(self, flow: Flow, what: str, exc: OSError) -> None:
        self.stats.error(what)
        self._end(flow, f"{what} towards {self.target} failed: {exc.strerror or exc}")

    def _end(self, flow: Flow, why: str) -> None:
        if self.flows.get(flow.addr) is flow:
            del self.flows[flow.addr]
        with contextlib.suppress(OSError, ValueError):
            self.loop.remove_reader(flow.fd)
        flow.close(self.stats.toxics)
        self.stats.open = len(self.flows)
        peer = fmt_peer(flow.addr)
        self._log(conn_log.info, "flow_close", peer, "flow from %s closed: %s", (peer, why))

    def _sweep_every(self) -> float:
        return min(1.0, (self.flow_timeout or 4.0) / 4)

    def _sweep(self) -> None:
        assert self.flow_timeout is not None
        deadline = self.loop.time() - self.flow_timeout
        for flow in [f for f in self.flows.values() if f.last <= deadline]:
            self._end(flow, f"idle for {self.flow_timeout:g}s")
        self._timers[:] = [self.loop.call_later(self._sweep_every(), self._sweep)]

    def _lost(self, exc: OSError) -> None:
        why = "datagram relay stopped: its socket failed: %s"
        self._log(server_log.error, "endpoint_lost", "", why, (exc,))
        self.close()

    def _log(self, log: Any, event: str, peer: str, message: str, args: tuple[Any, ...]) -> None:
        extra = {"event": event, "endpoint": self.endpoint, "peer": peer}
        log("%s: " + message, self.endpoint, *args, extra=extra)
