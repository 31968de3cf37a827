"""Per-endpoint runtime: the accept loop and connection bookkeeping for stream
endpoints, the receive loop and guards for datagram endpoints.

Why our own accept loop rather than ``loop.create_server``: it lets the server
stop accepting at ``--max-conns`` (clients wait in the kernel backlog), refuse
denied clients before any protocol object exists, and survive EMFILE by pausing
instead of spinning or dying (trio's ``_highlevel_serve_listeners.py`` reasoning).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import select
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from ..config import ServerConfig
from ..endpoints import Endpoint
from ..errors import ConfigError
from ..logs import conn_log, fmt_peer, server_log, service_log
from ..server.listeners import Listener
from ..service import Context, Service, is_async_handler
from .access import AccessControl
from .epoll import FastStream, Hub
from .fastio import BATCH as DATAGRAM_BATCH
from .fastio import SendBatch, batch_io
from .stream import AnyConn, SessionProtocol, StreamProtocol, TrackedConn
from .udpguard import CLASSIC_SERVICE_PORTS as CLASSIC_SERVICE_PORTS  # re-exported
from .udpguard import (
    LOOP,
    PRIVILEGED,
    SERVICE_PORT,
    UdpGuard,
    ephemeral_ports,
)
from .udpguard import LOOP_BURST as LOOP_BURST
from .udpguard import LOOP_RATE as LOOP_RATE

if TYPE_CHECKING:
    from ..server.server import Server

#: Connections accepted per wakeup before yielding to the loop (fairness vs. throughput).
ACCEPT_BATCH = 256
_EPOLLIN = getattr(select, "EPOLLIN", 1)
#: Datagrams handled per wakeup before yielding to the loop, read DATAGRAM_BATCH at a time.
RECV_BATCH = 128
#: Largest datagram read whole; a longer one is cut to this, as recvfrom(MAX_DATAGRAM) cuts.
MAX_DATAGRAM = 65536
#: Replies of a batch are sent together, but none waits longer than about this (plus
#: up to four handler calls) for the rest of its batch to be handled.
REPLY_HOLD_MAX = 0.0002
#: Async datagram requests running at once; past this, new ones are dropped (UDP may
#: drop), so a flood to a slow async handler cannot grow the task set without bound.
MAX_DATAGRAM_INFLIGHT = 1024
#: Of those, what one source may hold: a 16th of the cap, so a source whose requests never
#: finish leaves room for 15 more like it before anyone else is refused.
MAX_INFLIGHT_PER_SOURCE = 64
#: recv errors that mean the socket itself is gone, not one datagram's trouble.
_SOCKET_LOST_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL, errno.EFAULT})
#: Pause after an accept error such as EMFILE before trying again.
ACCEPT_RETRY_DELAY = 0.1
#: While accept keeps failing, log it at most this often (not ten lines a second for as
#: long as descriptors stay exhausted); the count of repeats goes in the next line.
ACCEPT_ERROR_LOG_EVERY = 5.0
#: Accept errors about one doomed connection: skip it.
_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET})
#: Give freed memory back to the OS (malloc_trim) once a listener's connections fall to
#: a quarter of their peak, when that peak was at least this many: a wave of connections
#: that all closed (glibc keeps what they freed, 50-300 KB each for TLS, for good).
TRIM_PEAK = 256
#: ...at most this often per process (a trim walks the whole heap: milliseconds).
TRIM_EVERY = 1.0


class StreamRuntime:
    """Serves one stream listener: accepts, builds protocols, tracks connections."""

    def __init__(
        self,
        server: Server,
        listener: Listener,
        service: Service,
        config: ServerConfig,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.server = server
        self.loop = server.loop
        self.listener = listener
        self.endpoint: Endpoint = listener.endpoint
        self.service = service
        self.config = config
        self.ssl_context = ssl_context
        self.handler: Any = service.handler
        self.is_async = is_async_handler(service.handler)
        # Plain request/reply connections go on the epoll engine when the server has one.
        self.hub = (
            server.hub
            if ssl_context is None
            and service.stream is None
            and not config.proxy_protocol
            and config.engine == "auto"
            else None
        )
        self.access = AccessControl(config.allow, config.deny)
        self.conns: set[TrackedConn] = set()
        self.pending = 0  # accepted sockets whose transport is still being set up (TLS)
        self._reading = False
        self._retry: asyncio.TimerHandle | None = None
        self._limit_logged = False
        self._accept_error_logged_at = -ACCEPT_ERROR_LOG_EVERY
        self._accept_errors_unlogged = 0
        self._stopped = False
        #: Replaced by a reload: connections still being set up are served, not drained.
        self.serve_out = False
        self._close_reasons: dict[int, str] = {}
        #: TLS handshakes in progress, oldest first (a dict keeps insertion order).
        self._handshakes: dict[asyncio.Task[None], None] = {}
        self._evicted_unlogged = 0
        self._evict_logged_at = -ACCEPT_ERROR_LOG_EVERY
        self._peak = 0  # most connections open at once since memory was last trimmed
        self._factory: Callable[[Any], AnyConn]
        if service.stream is not None:
            self._factory = lambda peer: SessionProtocol(self, peer)
        elif service.handler is not None:
            self._factory = lambda peer: StreamProtocol(self, peer)
        else:
            raise ValueError(f"service {service.name} has no stream behaviour")
        #: Connections closed for a reason worth counting, by kind (read by metrics at scrape time).
        self.errors: dict[str, int] = {}
        if config.proxy_protocol:
            self._use_proxy_protocol()

    def _use_proxy_protocol(self) -> None:
        """Read a PROXY header first; the accept-time gate becomes --proxy-from, and
        --allow/--deny apply to the real client named in the header."""
        from .proxywrap import wrap_factory

        if self.ssl_context is not None:
            raise ConfigError(
                f"{self.endpoint}: --proxy-protocol on tls:// is not supported; "
                "terminate TLS at the proxy and listen on tcp://"
            )
        self._factory = wrap_factory(self, self._factory)  # type: ignore[assignment]
        self.access = AccessControl(self.config.proxy_from, ())

    # -- accepting ---------------------------------------------------------------------

    def start(self) -> None:
        self._resume_accept()

    def _resume_accept(self) -> None:
        self._retry = None
        if not self._reading and not self._stopped:
            self.loop.add_reader(self.listener.sock.fileno(), self._accept_ready)
            self._reading = True

    def _pause_accept(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.listener.sock.fileno())
            self._reading = False

    def _accept_ready(self) -> None:
        lsock = self.listener.sock
        for _ in range(ACCEPT_BATCH):
            if self.server.at_limit():
                self._pause_accept()
                if not self._limit_logged:
                    self._limit_logged = True
                    server_log.warning(
                        "%s: at the connection limit (%d); not accepting until one closes",
                        self.endpoint,
                        self.server.max_conns,
                        extra={"event": "limit", "endpoint": self.endpoint},
                    )
                return
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _SKIP_ERRNOS:
                    continue
                self._log_accept_error(exc)
                # EMFILE and friends (or anything unknown): pause rather than spin or die.
                self.errors["accept"] = self.errors.get("accept", 0) + 1
                self._pause_accept()
                self._retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accept)
                return
            self._accepted(sock, addr)

    def _log_accept_error(self, exc: OSError) -> None:
        now = self.loop.time()
        if now - self._accept_error_logged_at < ACCEPT_ERROR_LOG_EVERY:
            self._accept_errors_unlogged += 1
            return
        repeats = self._accept_errors_unlogged
        server_log.error(
            "%s: accept failed: %s; retrying every %.1fs%s",
            self.endpoint,
            exc.strerror or exc,
            ACCEPT_RETRY_DELAY,
            f" ({repeats} more since the last report)" if repeats else "",
            extra={"event": "accept_error", "endpoint": self.endpoint, "reason": str(exc)},
        )
        self._accept_error_logged_at = now
        self._accept_errors_unlogged = 0

    def _accepted(self, sock: socket.socket, addr: Any) -> None:
        if self.access.active and isinstance(addr, tuple) and not self.access.permits(addr[0]):
            conn_log.info(
                "%s: denied %s",
                self.endpoint,
                fmt_peer(addr),
                extra={"event": "denied", "endpoint": self.endpoint, "peer": fmt_peer(addr)},
            )
            self.errors["denied"] = self.errors.get("denied", 0) + 1
            sock.close()
            return
        sock.setblocking(False)
        if self.endpoint.is_inet:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.conn_count += 1
        opened = len(self.conns) + self.pending + 1
        if opened > self._peak:
            self._peak = opened
        if self.hub is not None:
            try:
                FastStream(self, self.hub, sock, addr)
            except OSError as exc:  # could not register: treat like a failed setup
                self.server.conn_count -= 1
                sock.close()
                conn_log.info(
                    "%s: connection from %s failed during setup: %s",
                    self.endpoint,
                    fmt_peer(addr),
                    exc,
                )
            return
        self.pending += 1
        if self.ssl_context is not None and self.config.max_handshakes:
            self._bound_handshakes()
        task = self.loop.create_task(self._connect(sock, addr))
        self.server.track(task)
        if self.ssl_context is not None:
            self._handshakes[task] = None
            task.add_done_callback(self._handshake_ended)

    def _bound_handshakes(self) -> None:
        """At --max-handshakes, drop the oldest handshake to make room for the new one.

        Why the oldest rather than pausing accept: a real client finishes its handshake in
        a round trip, so the oldest is the likeliest silent one; pausing would let a few
        hundred silent clients shut every TLS client out for the handshake timeout.
        """
        while len(self._handshakes) >= self.config.max_handshakes:
            oldest = next(iter(self._handshakes))
            del self._handshakes[oldest]
            oldest.cancel()
            self.errors["handshake_evicted"] = self.errors.get("handshake_evicted", 0) + 1
            now = self.loop.time()
            if now - self._evict_logged_at < ACCEPT_ERROR_LOG_EVERY:
                self._evicted_unlogged += 1
                continue
            repeats, self._evicted_unlogged = self._evicted_unlogged, 0
            self._evict_logged_at = now
            server_log.warning(
                "%s: %d TLS handshakes in progress (--max-handshakes); dropping the oldest%s",
                self.endpoint,
                self.config.max_handshakes,
                f" ({repeats} more since the last report)" if repeats else "",
                extra={"event": "handshake_evicted", "endpoint": self.endpoint},
            )

    def _handshake_ended(self, task: asyncio.Task[None]) -> None:
        self._handshakes.pop(task, None)

    async def _connect(self, sock: socket.socket, addr: Any) -> None:
        proto: AnyConn | None = None

        def factory() -> AnyConn:
            nonlocal proto
            proto = self._factory(addr)
            return proto

        try:
            if self.ssl_context is not None:
                await self.loop.connect_accepted_socket(
                    factory,
                    sock,
                    ssl=self.ssl_context,
                    ssl_handshake_timeout=self.config.tls_handshake_timeout,
                )
            else:
                await self.loop.connect_accepted_socket(factory, sock)
        except asyncio.CancelledError:  # dropped at --max-handshakes, or shutting down
            sock.close()
            if proto is None or proto not in self.conns:
                self.server.conn_count -= 1
                self._slot_freed()
                self._maybe_trim()
            raise
        except Exception as exc:  # TLS handshake failure, peer reset before setup...
            conn_log.info(
                "%s: connection from %s failed during setup: %s",
                self.endpoint,
                fmt_peer(addr),
                _describe(exc),
                extra={"event": "setup_failed", "endpoint": self.endpoint, "peer": fmt_peer(addr)},
            )
            self.errors["setup"] = self.errors.get("setup", 0) + 1
            sock.close()
            if proto is None or proto not in self.conns:
                self.server.conn_count -= 1
                self._slot_freed()
                self._maybe_trim()
        finally:
            self.pending -= 1

    # -- connection bookkeeping (called by the protocols) ------------------------------

    def opened(self, conn: TrackedConn) -> None:
        self.conns.add(conn)
        conn.idle_since = self.loop.time()
        conn_log.info(
            "%s: open from %s",
            self.endpoint,
            fmt_peer(conn.ctx.peer),
            extra={"event": "open", "endpoint": self.endpoint, "peer": fmt_peer(conn.ctx.peer)},
        )
        if self._stopped and (not self.serve_out or self.server._stopping):
            conn.drain()

    def note_close_reason(self, conn: TrackedConn, reason: str) -> None:
        self._close_reasons[id(conn)] = reason

    def closed(self, conn: TrackedConn, exc: Exception | None) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        self.server.conn_count -= 1
        reason = self._close_reasons.pop(id(conn), None)
        if reason is None:
            reason = f"error: {_describe(exc)}" if exc is not None else "closed"
        kind = None if reason == "closed" else _error_kind(reason)
        if kind is not None:
            self.errors[kind] = self.errors.get(kind, 0) + 1
        log = conn_log.warning if reason.startswith("protocol error") else conn_log.info
        log(
            "%s: close %s (%s)",
            self.endpoint,
            fmt_peer(conn.ctx.peer),
            reason,
            extra={
                "event": "close",
                "endpoint": self.endpoint,
                "peer": fmt_peer(conn.ctx.peer),
                "reason": reason,
            },
        )
        self._slot_freed()
        self._maybe_trim()
        self.server.conn_closed()

    def _maybe_trim(self) -> None:
        """After a wave of connections (a quarter of TRIM_PEAK's peak left), trim memory."""
        peak = self._peak
        if peak >= TRIM_PEAK and (len(self.conns) + self.pending) * 4 <= peak:
            self._peak = 0
            release_memory(self.loop)

    def _slot_freed(self) -> None:
        server = self.server
        if server.max_conns is None or server.at_limit():
            return
        # The limit is shared: the listener paused at it may not be the one whose
        # connection closed, so look at every one (a listener waiting out an accept
        # error keeps its retry timer).
        for rt in server.streams:
            if rt._reading or rt._retry is not None or rt._stopped:
                continue
            if rt._limit_logged:
                rt._limit_logged = False
                server_log.info(
                    "%s: below the connection limit again; accepting",
                    rt.endpoint,
                    extra={"event": "limit_cleared", "endpoint": rt.endpoint},
                )
            rt._resume_accept()

    def sweep_idle(self, now: float, timeout: float) -> None:
        for conn in list(self.conns):
            if conn.active:
                conn.active = False
                conn.idle_since = now
            elif not conn.busy and now - conn.idle_since >= timeout:
                self.note_close_reason(conn, f"idle for {timeout:g}s")
                conn.abort()

    # -- shutdown ----------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self._stopped = True
        self._pause_accept()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def drain(self) -> None:
        for conn in list(self.conns):
            conn.drain()

    def abort_all(self) -> None:
        for conn in list(self.conns):
            self.note_close_reason(conn, "drain timeout")
            conn.abort()


class DatagramRuntime:
    """Serves one datagram socket: read in batches, guard, answer inline or via a task.

    Error handling: whatever goes wrong with one datagram (the handler raises, even
    ``SystemExit`` or another ``BaseException``; the reply is not bytes; it cannot be
    sent; the sender has no address to reply to) drops that datagram only, logged, and
    the rest of its batch is still served. ``KeyboardInterrupt`` is re-raised (it may be
    a real SIGINT), after the batch's replies so far are sent and its unread rest kept
    for the next turn. An error about the socket itself (EBADF...) or a bug here loses
    the endpoint: that is logged at error and the server stops with a failure status
    (``Server.lost``), never left running without it.

    Guards (inet endpoints), checked before the handler runs:

    - source ports below ``udp_min_source_port`` (1024), and port 0, are dropped;
    - loops (CVE-1999-0103: two services answering each other forever): a datagram
      from a port this server serves on UDP, or from a classic small service's port
      (:data:`CLASSIC_SERVICE_PORTS`), is dropped, as inetd does; and where the rate
      limit is off by default (loopback binds), a source on a fixed port (outside this
      host's ephemeral range, so a service rather than a client) gets a budget of
      :data:`LOOP_BURST` replies refilled at :data:`LOOP_RATE`/s, so a loop between
      two services on other ports dies within about 2 x LOOP_BURST hops. An explicit
      ``udp_rate=0`` turns that budget off too; any other rate bounds loops itself;
    - ``--allow``/``--deny``, the per-host rate limit, the amplification cap.

    Resource handling: at most :data:`MAX_DATAGRAM_INFLIGHT` async requests run at
    once, and at most :data:`MAX_INFLIGHT_PER_SOURCE` of them from one source (its
    address; every unbound Unix client counts as one source), so a source whose
    requests never finish cannot leave the others unanswered; past either, new
    datagrams are dropped (UDP may drop) and counted in ``dropped``.
    """

    def __init__(
        self, server: Server, listener: Listener, service: Service, config: ServerConfig
    ) -> None:
        self.server = server
        self.loop = server.loop
        self.listener = listener
        self.endpoint = listener.endpoint
        self.service = service
        self.config = config
        handler = service.datagram_handler()
        if handler is None:
            raise ValueError(f"service {service.name} has no datagram behaviour")
        self.handler: Any = handler
        self.is_async = is_async_handler(handler)
        inet = self.endpoint.is_inet
        self.inet = inet
        guard = self.guard = UdpGuard(
            config, inet=inet, host=self.endpoint.host, replies_larger=service.replies_larger
        )
        self.access = guard.access
        self.min_port = guard.min_port
        self.rate = rate = guard.rate
        self.loop_guard = guard.loop_guard
        self.guard_amplify = guard.amplify_guard
        self.inflight: set[asyncio.Task[None]] = set()
        #: Async requests running, by source (only sources with some running).
        self.inflight_by_source: dict[Any, int] = {}
        self._hub: Hub | None = None
        self._reading = False
        self._lost = False
        #: The unserved rest of a batch that KeyboardInterrupt stopped (served next turn).
        self._rest: list[tuple[bytes, Any]] = []
        self.dropped = 0
        self._io = batch_io(listener.sock)
        self._guarded = inet and (
            self.access.active or rate > 0 or self.min_port > 0 or self.guard_amplify
        )

    def start(self) -> None:
        hub = self.server.hub
        if hub is not None and self.config.engine == "auto":
            self._hub = hub
            hub.add(self.listener.sock.fileno(), self, _EPOLLIN)
        else:
            self.loop.add_reader(self.listener.sock.fileno(), self.on_readable)
        self._reading = True

    def on_event(self, events: int) -> None:
        self.on_readable()

    def abort(self) -> None:
        """The hub's end for a member that failed (it logged why): the endpoint is lost."""
        self._endpoint_lost("internal error (logged above)")

    def stop_accepting(self) -> None:
        if self._reading:
            self._reading = False
            if self._hub is not None:
                self._hub.remove(self.listener.sock.fileno())
            else:
                self.loop.remove_reader(self.listener.sock.fileno())

    def on_readable(self) -> None:
        """The reader callback, for both engines: nothing that escapes one datagram's
        handling may end the endpoint quietly."""
        if not self._reading:
            return
        try:
            self._readable()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            if isinstance(exc, OSError):
                self._endpoint_lost(f"its socket failed: {_describe(exc)}")
            else:
                server_log.exception("%s: internal error reading datagrams", self.endpoint)
                self._endpoint_lost(f"internal error: {_describe(exc)}")

    def _endpoint_lost(self, why: str) -> None:
        if self._lost:
            return
        self._lost = True
        with contextlib.suppress(Exception):
            self.stop_accepting()
        server_log.error(
            "%s: endpoint lost (%s); stopping the server with a failure status",
            self.endpoint,
            why,
            extra={"event": "endpoint_lost", "endpoint": self.endpoint, "reason": why},
        )
        self.server.endpoint_lost(self.endpoint)

    def _readable(self) -> None:
        target, recv, _ = self._io
        # A port this server serves on UDP is never a client's (see the class docstring).
        server_ports = [d.endpoint.port for d in self.server.datagrams if d.inet]
        if self.inet:
            self.guard.serving(server_ports)
        for _ in range(RECV_BATCH // DATAGRAM_BATCH):
            if self._rest:
                batch, self._rest = self._rest, []
            else:
                try:
                    batch = recv(target, DATAGRAM_BATCH, MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    if exc.errno in _SOCKET_LOST_ERRNOS:
                        raise
                    # e.g. ECONNREFUSED from an earlier ICMP error: about one datagram.
                    server_log.debug("%s: recvfrom: %s", self.endpoint, exc)
                    continue
            self._serve_batch(batch)
            if len(batch) < DATAGRAM_BATCH:
                return  # the socket was drained: wait for the next wakeup

    def _serve_batch(self, batch: list[tuple[bytes, Any]]) -> None:
        target, _, send = self._io
        handler = self.handler
        is_async = self.is_async
        # Hot loop: the common guards (source port) are checked inline; rate, access,
        # loop budget and amplification go through methods only when configured. Plain
        # bytes replies are sent together after the batch (one sendmmsg with the helper).
        inet = self.inet
        min_port = self.min_port
        own = self.guard.own_ports
        loop_guard = self.loop_guard
        eph_lo, eph_hi = ephemeral_ports()
        slow_guard = self._guarded and (self.access.active or self.rate > 0)
        plain_send = not self.guard_amplify
        local = self.endpoint
        clock = time.perf_counter
        replies: list[tuple[bytes, Any]] = []
        held_since = clock()
        index = 0
        try:
            for index, (data, addr) in enumerate(batch):  # noqa: B007 - read when interrupted
                if inet:
                    port = addr[1]
                    if (
                        port < min_port
                        or port in own
                        or slow_guard
                        or (loop_guard and not eph_lo <= port <= eph_hi)
                    ) and not self._admit(addr):
                        continue
                ctx = Context(addr, local)
                if is_async:
                    self._start_async(data, ctx)
                    continue
                try:
                    reply = handler(data, ctx)
                except KeyboardInterrupt:
                    raise
                except BaseException:  # SystemExit too: this datagram's failure only
                    self._handler_failed(addr)
                    continue
                if reply is None:
                    continue
                if not addr:
                    self._no_return_address(addr)
                elif plain_send and type(reply) is bytes:
                    replies.append((reply, addr))
                    # A slow handler must not hold earlier replies for the whole batch:
                    # every 4th reply, send what waited longer than REPLY_HOLD_MAX.
                    if not len(replies) & 3 and clock() - held_since > REPLY_HOLD_MAX:
                        self._send_replies(target, send, replies)
                        replies = []
                        held_since = clock()
                else:
                    self._send(data, reply, addr)
        except KeyboardInterrupt:
            self._keep_rest(batch[index + 1 :])
            raise
        finally:
            if replies:
                self._send_replies(target, send, replies)

    def _keep_rest(self, rest: list[tuple[bytes, Any]]) -> None:
        """Datagrams read but not served when KeyboardInterrupt stopped their batch: served
        on the next turn if the server goes on (they are no longer in the socket to wake it)."""
        if rest:
            self._rest = rest
            self.loop.call_soon(self.on_readable)

    def _start_async(self, data: bytes, ctx: Context) -> None:
        source = ctx.peer
        by_source = self.inflight_by_source
        held = by_source.get(source, 0)
        if held >= MAX_INFLIGHT_PER_SOURCE or len(self.inflight) >= MAX_DATAGRAM_INFLIGHT:
            self.dropped += 1
            return
        task = self.loop.create_task(self._answer_async(data, ctx))
        by_source[source] = held + 1
        self.inflight.add(task)
        task.add_done_callback(functools.partial(self._async_done, source))

    def _async_done(self, source: Any, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        left = self.inflight_by_source.get(source, 1) - 1
        if left > 0:
            self.inflight_by_source[source] = left
        else:
            self.inflight_by_source.pop(source, None)

    def _send_replies(self, target: Any, send: SendBatch, replies: list[tuple[bytes, Any]]) -> None:
        try:
            failed = send(target, replies)
        except (TypeError, ValueError, OverflowError):
            # An address the batch call refused: send one by one, so only that one fails.
            for reply, addr in replies:
                self._send(b"", reply, addr, capped=False)
            return
        if failed is None:
            return
        for index, err in failed:
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.dropped += 1  # the socket buffer is full: UDP drops, so do we
            else:
                conn_log.info(
                    "%s: sendto %s failed: %s",
                    self.endpoint,
                    fmt_peer(replies[index][1]),
                    os.strerror(err),
                )

    def _send(self, request: bytes, reply: Any, addr: Any, capped: bool = True) -> None:
        try:
            if not addr:
                self._no_return_address(addr)
                return
            if capped and self.guard_amplify:
                cut = self.guard.cap(request, reply, addr)
                if not cut and reply:
                    return  # cut to nothing (an empty request): nothing to send
                reply = cut
            self.listener.sock.sendto(reply, addr)
        except (BlockingIOError, InterruptedError):
            self.dropped += 1  # the socket buffer is full: UDP drops, so do we
        except OSError as exc:
            conn_log.info("%s: sendto %s failed: %s", self.endpoint, fmt_peer(addr), exc)
        except (TypeError, ValueError, OverflowError):
            service_log.error(
                "handler %s returned %s, not bytes; datagram from %s dropped",
                self.service.name,
                type(reply).__name__,
                fmt_peer(addr),
            )

    def _no_return_address(self, addr: Any) -> None:
        conn_log.debug(
            "%s: served a datagram from an unbound socket (no return address); no reply sent",
            self.endpoint,
            extra={"event": "no_return_address", "endpoint": self.endpoint},
        )

    async def _answer_async(self, data: bytes, ctx: Context) -> None:
        try:
            reply = await cast(Awaitable[Any], self.handler(data, ctx))
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise
        except BaseException:  # SystemExit too: this datagram's failure only
            self._handler_failed(ctx.peer)
            return
        if reply is not None:
            self._send(data, reply, ctx.peer)

    def _admit(self, addr: Any) -> bool:
        if not isinstance(addr, tuple):
            return True
        why = self.guard.admit(addr[0], addr[1], self.loop.time(), ephemeral_ports())
        if why is None:
            return True
        self.dropped += 1
        message = _DROP_MESSAGES.get(why)
        if message is not None:
            conn_log.debug(message, self.endpoint, fmt_peer(addr))
        return False

    def _handler_failed(self, addr: Any) -> None:
        service_log.exception(
            "handler %s raised on %s for a datagram from %s; dropped it",
            self.service.name,
            self.endpoint,
            fmt_peer(addr),
            extra={"event": "handler_error", "endpoint": self.endpoint, "peer": fmt_peer(addr)},
        )


#: The debug line for a dropped datagram, by the guard's reason (denied and rate: none).
_DROP_MESSAGES = {
    PRIVILEGED: "%s: dropped datagram from privileged port %s",
    SERVICE_PORT: "%s: dropped datagram from %s: a service's port (a reply could start a loop)",
    LOOP: "%s: dropped datagram from %s: over the loop budget of a fixed source port",
}

_trim: Callable[[int], int] | None = None
_last_trim = -TRIM_EVERY
_trim_scheduled_for = -TRIM_EVERY  # a loop that closes first just never runs it


def _load_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (musl, other systems)."""
    try:
        import ctypes

        return cast(Callable[[int], int], ctypes.CDLL(None).malloc_trim)
    except (OSError, AttributeError, ImportError):
        return None


def release_memory(loop: asyncio.AbstractEventLoop) -> None:
    """Give the heap's free memory back to the OS, at most once per TRIM_EVERY.

    Why: glibc keeps memory that many connections freed at once (TLS buffers, socket
    reads) in its arenas, and RSS stays at the peak of the largest wave for good;
    ``malloc_trim(0)`` returns it. Delayed a little, so a wave that is still closing
    costs one trim, not one per connection.
    """
    global _trim, _trim_scheduled_for
    if _trim is None:
        _trim = _load_trim() or (lambda pad: 0)
    now = time.monotonic()
    if now < _trim_scheduled_for:
        return  # one is due already
    _trim_scheduled_for = max(now + 0.05, _last_trim + TRIM_EVERY)
    loop.call_later(_trim_scheduled_for - now, _run_trim)


def _run_trim() -> None:
    global _last_trim
    _last_trim = time.monotonic()
    if _trim is not None:
        _trim(0)


#: Close reasons counted as errors, by prefix (the metrics' ``kind`` label).
_ERROR_KINDS = (
    ("protocol error", "protocol"),
    ("PROXY header", "proxy"),
    ("idle for", "idle_timeout"),
    ("drain timeout", "drain_timeout"),
    ("denied", "denied"),
    ("error:", "reset"),
)


def _error_kind(reason: str) -> str | None:
    for prefix, kind in _ERROR_KINDS:
        if reason.startswith(prefix):
            return kind
    return None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
