"""Per-endpoint runtime: the accept loop and connection bookkeeping for stream
endpoints (datagram endpoints: :mod:`.datagram`).

Why our own accept loop rather than ``loop.create_server``: it lets the server
stop accepting at ``--max-conns`` (clients wait in the kernel backlog), refuse
denied clients before any protocol object exists, and survive EMFILE by pausing
instead of spinning or dying (trio's ``_highlevel_serve_listeners.py`` reasoning).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Callable
from typing import Any

from ..config import ServerConfig
from ..errors import ConfigError
from ..logs import conn_log, fmt_peer, server_log
from ..service import Service
from .contracts import (
    TRIM_PEAK,
    BoundSocket,
    CloseReason,
    Conn,
    EndpointRuntime,
    RuntimeHost,
    describe,
    release_memory,
)
from .faststream import FastStream
from .guards import AccessControl
from .proxywrap import ProxyHeaderProtocol, wrap_factory
from .requests import HandlerCalls
from .stream import AnyConn, SessionProtocol, StreamProtocol

#: Connections accepted per wakeup before yielding to the loop (fairness vs. throughput).
ACCEPT_BATCH = 256
#: Pause after an accept error such as EMFILE before trying again.
ACCEPT_RETRY_DELAY = 0.1
#: While accept keeps failing, log it at most this often (not ten lines a second for as
#: long as descriptors stay exhausted); the count of repeats goes in the next line.
ACCEPT_ERROR_LOG_EVERY = 5.0
#: Accept errors about one doomed connection: skip it.
_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET})


class StreamRuntime(EndpointRuntime):
    """Serves one stream listener: accepts, builds protocols, tracks connections.

    The owner (:class:`~.contracts.ConnOwner`) its connections report to; it reports to
    its host (the server) and takes a slot of the server-wide budget per connection.
    """

    def __init__(
        self,
        host: RuntimeHost,
        listener: BoundSocket,
        service: Service,
        config: ServerConfig,
        ssl_context: ssl.SSLContext | None = None,
        tls_conn: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(host, listener, service, config)
        self.budget = host.budget
        self.ssl_context = ssl_context
        #: Makes a TLS request/reply connection on the hub (server/tlsconn.py), or None.
        self.tls_conn = tls_conn if ssl_context is not None else None
        self.handler: Any = service.handler
        self.calls = HandlerCalls.of(host.handler_pool, service.handler, service.name, config)
        self.is_async = self.calls.is_async
        # Request/reply connections go on the epoll engine when the server has one (TLS ones
        # too, with tls_conn); a relay (Service.adopt) takes plain sockets raw.
        auto = not config.proxy_protocol and config.engine == "auto"
        tls_ok = ssl_context is None or self.tls_conn is not None
        self.hub = host.hub if tls_ok and service.stream is None and auto else None
        if self.hub is not None:
            self.calls.watch(self.hub)
        plain = ssl_context is None and auto and host.hub is not None
        self.adopt = service.adopt if plain else None
        self.access = AccessControl(config.allow, config.deny)
        self.conns: set[Conn] = set()
        self.pending = 0  # accepted sockets whose transport is still being set up (TLS)
        self._reading = False
        self._retry: asyncio.TimerHandle | None = None
        self._limit_logged = False
        self._accept_error_logged_at = -ACCEPT_ERROR_LOG_EVERY
        self._accept_errors_unlogged = 0
        self._stopped = False
        #: Replaced by a reload: connections still being set up are served, not drained.
        self.serve_out = False
        self._close_reasons: dict[int, tuple[CloseReason, str]] = {}
        #: TLS handshakes in progress, oldest first (a dict keeps insertion order).
        self._handshakes: dict[Any, None] = {}  # tasks, or tls_conn connections
        self._evicted_unlogged = 0
        self._evict_logged_at = -ACCEPT_ERROR_LOG_EVERY
        self._peak = 0  # most connections open at once since memory was last trimmed
        inner: Callable[[Any], AnyConn]
        if service.stream is not None:
            inner = lambda peer: SessionProtocol(self, peer)  # noqa: E731
        elif service.handler is not None:
            inner = lambda peer: StreamProtocol(self, peer)  # noqa: E731
        else:
            raise ValueError(f"service {service.name} has no stream behaviour")
        self._factory: Callable[[Any], AnyConn | ProxyHeaderProtocol] = inner
        #: Connections closed for a reason worth counting, by kind (read by metrics at scrape time).
        self.errors: dict[str, int] = {}
        if config.proxy_protocol:
            self._use_proxy_protocol(inner)

    def _use_proxy_protocol(self, inner: Callable[[Any], AnyConn]) -> None:
        """Read a PROXY header first; the accept-time gate becomes --proxy-from, and
        --allow/--deny apply to the real client named in the header."""
        if self.ssl_context is not None:
            raise ConfigError(
                f"{self.endpoint}: --proxy-protocol on tls:// is not supported; "
                "terminate TLS at the proxy and listen on tcp://"
            )
        self._factory = wrap_factory(self, inner)
        self.access = AccessControl(self.config.proxy_from, ())

    # -- accepting ---------------------------------------------------------------------

    def start(self) -> None:
        self.budget.join(self)
        self._resume_accept()

    def below_limit(self) -> None:
        """The budget has a slot again: resume if paused at the limit (a listener waiting
        out an accept error keeps its retry timer)."""
        if self._reading or self._retry is not None or self._stopped:
            return
        if self._limit_logged:
            self._limit_logged = False
            server_log.info(
                "%s: below the connection limit again; accepting",
                self.endpoint,
                extra={"event": "limit_cleared", "endpoint": self.endpoint},
            )
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
            if self.budget.at_limit():
                self._pause_accept()
                if not self._limit_logged:
                    self._limit_logged = True
                    server_log.warning(
                        "%s: at the connection limit (%d); not accepting until one closes",
                        self.endpoint,
                        self.budget.limit,
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
            peer = fmt_peer(addr)
            extra = {"event": "denied", "endpoint": self.endpoint, "peer": peer}
            conn_log.info("%s: denied %s", self.endpoint, peer, extra=extra)
            self.errors["denied"] = self.errors.get("denied", 0) + 1
            sock.close()
            return
        sock.setblocking(False)
        if self.endpoint.is_inet:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.budget.take()
        opened = len(self.conns) + self.pending + 1
        if opened > self._peak:
            self._peak = opened
        if self.adopt is not None and self.adopt(self, self.host.hub, sock, addr):
            return  # taken raw (Service.adopt: the relay's pump); it reports like any conn
        if self.ssl_context is not None and self.config.max_handshakes:
            self._bound_handshakes()
        if self.hub is not None:
            try:
                if self.tls_conn is not None:
                    self._handshakes[self.tls_conn(self, self.hub, sock, addr)] = None
                    self.pending += 1
                else:
                    FastStream(self, self.hub, sock, addr)
            except OSError as exc:  # could not register: treat like a failed setup
                sock.close()
                self._setup_failed(addr, exc)
            return
        self.pending += 1
        task = self.loop.create_task(self._connect(sock, addr))
        self.host.track(task)
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

    def handshake_ended(self, conn: Any, exc: BaseException | None) -> None:
        """A tls_conn connection's handshake ended: it opened (None) or failed with exc."""
        self._handshakes.pop(conn, None)
        self.pending -= 1
        if exc is not None:
            self._setup_failed(conn.ctx.peer, exc)

    def _setup_failed(self, addr: Any, exc: BaseException, free: bool = True) -> None:
        """Setting a connection up failed: log why (not when dropped), free its slot."""
        if not isinstance(exc, asyncio.CancelledError):
            conn_log.info(
                "%s: connection from %s failed during setup: %s",
                self.endpoint,
                fmt_peer(addr),
                describe(exc),
                extra={"event": "setup_failed", "endpoint": self.endpoint, "peer": fmt_peer(addr)},
            )
            self.errors["setup"] = self.errors.get("setup", 0) + 1
        if free:
            self._maybe_trim()
            self.budget.give_back()

    async def _connect(self, sock: socket.socket, addr: Any) -> None:
        proto: AnyConn | ProxyHeaderProtocol | None = None

        def factory() -> AnyConn | ProxyHeaderProtocol:
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
        except (asyncio.CancelledError, Exception) as exc:  # dropped, TLS failure, reset...
            sock.close()
            self._setup_failed(addr, exc, proto is None or proto not in self.conns)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.pending -= 1

    # -- connection bookkeeping (called by the protocols) ------------------------------

    def opened(self, conn: Conn) -> None:
        self.conns.add(conn)
        conn.idle_since = self.loop.time()
        conn_log.info(
            "%s: open from %s",
            self.endpoint,
            fmt_peer(conn.ctx.peer),
            extra={"event": "open", "endpoint": self.endpoint, "peer": fmt_peer(conn.ctx.peer)},
        )
        if self._stopped and (not self.serve_out or self.host.stopping):
            conn.drain()

    def note_close_reason(self, conn: Conn, reason: CloseReason, detail: str = "") -> None:
        self._close_reasons[id(conn)] = (reason, detail)

    def hold(self, conn: Conn) -> None:
        self.conns.add(conn)
        conn.idle_since = self.loop.time()

    def release(self, conn: Conn) -> None:
        self.conns.discard(conn)

    def closed(self, conn: Conn, exc: Exception | None) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        noted = self._close_reasons.pop(id(conn), None)
        if noted is None:
            noted = (
                (CloseReason.ERROR, describe(exc)) if exc is not None else (CloseReason.CLOSED, "")
            )
        reason, detail = noted
        if reason.kind is not None:
            self.errors[reason.kind] = self.errors.get(reason.kind, 0) + 1
        text = reason.text(detail)
        peer = fmt_peer(conn.ctx.peer)
        conn_log.log(
            reason.level,
            "%s: close %s (%s)",
            self.endpoint,
            peer,
            text,
            extra={"event": "close", "endpoint": self.endpoint, "peer": peer, "reason": text},
        )
        self._maybe_trim()
        self.budget.give_back()

    def _maybe_trim(self) -> None:
        """After a wave of connections (a quarter of TRIM_PEAK's peak left), trim memory."""
        peak = self._peak
        if peak >= TRIM_PEAK and (len(self.conns) + self.pending) * 4 <= peak:
            self._peak = 0
            release_memory(self.loop)

    def sweep_idle(self, now: float, timeout: float) -> None:
        for conn in list(self.conns):
            if conn.active:
                conn.active = False
                conn.idle_since = now
            elif not conn.busy and now - conn.idle_since >= timeout:
                self.note_close_reason(conn, CloseReason.IDLE, f"{timeout:g}s")
                conn.abort()

    # -- shutdown ----------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self._stopped = True
        self.budget.leave(self)
        self._pause_accept()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def drain(self) -> None:
        for conn in list(self.conns):
            conn.drain()

    def abort_all(self) -> None:
        for handshake in list(self._handshakes):
            handshake.cancel()
        for conn in list(self.conns):
            self.note_close_reason(conn, CloseReason.DRAIN_TIMEOUT)
            conn.abort()
