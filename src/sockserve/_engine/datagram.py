"""Per-endpoint runtime for datagram endpoints: the receive loop, its guards, the replies."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import select
import time
from typing import Any

from ..config import ServerConfig
from ..logs import conn_log, fmt_peer, server_log, service_log
from ..service import Context, Service
from .contracts import BoundSocket, EndpointRuntime, RuntimeHost, describe
from .fastio import BATCH as DATAGRAM_BATCH
from .fastio import SendBatch, batch_io
from .guards import CLASSIC_SERVICE_PORTS as CLASSIC_SERVICE_PORTS  # re-exported
from .guards import (
    LOOP,
    PRIVILEGED,
    SERVICE_PORT,
    UdpGuard,
    ephemeral_ports,
)
from .guards import LOOP_BURST as LOOP_BURST
from .guards import LOOP_RATE as LOOP_RATE
from .requests import HandlerCalls, start_task

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


class DatagramRuntime(EndpointRuntime):
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
        self, host: RuntimeHost, listener: BoundSocket, service: Service, config: ServerConfig
    ) -> None:
        super().__init__(host, listener, service, config)
        handler = service.datagram_handler()
        if handler is None:
            raise ValueError(f"service {service.name} has no datagram behaviour")
        self.handler: Any = handler
        self.calls = HandlerCalls.of(host.handler_pool, handler, service.name, config)
        self.is_async = self.calls.is_async
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
        #: The epoll hub this socket is read from (None: the event loop's reader).
        self._hub = host.hub if config.engine == "auto" else None
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
        if self._hub is not None:
            self._hub.add(self.listener.sock.fileno(), self, _EPOLLIN)
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
                self._endpoint_lost(f"its socket failed: {describe(exc)}")
            else:
                server_log.exception("%s: internal error reading datagrams", self.endpoint)
                self._endpoint_lost(f"internal error: {describe(exc)}")

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
        self.host.endpoint_lost(self.endpoint)

    def _readable(self) -> None:
        target, recv, _ = self._io
        # A port this server serves on UDP is never a client's (see the class docstring).
        if self.inet:
            self.guard.serving(self.host.datagram_ports())
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
        handler, calls, local = self.handler, self.calls, self.endpoint
        # Hot loop: the common guards (source port) are checked inline; rate, access,
        # loop budget and amplification go through methods only when configured. Plain
        # bytes replies are sent together after the batch (one sendmmsg with the helper).
        inet, min_port = self.inet, self.min_port
        own, loop_guard = self.guard.own_ports, self.loop_guard
        eph_lo, eph_hi = ephemeral_ports()
        slow_guard = self._guarded and (self.access.active or self.rate > 0)
        plain_send = not self.guard_amplify
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
                if not calls.inline:  # async, or a def seen (or marked) to block
                    self._start_async(data, ctx)
                    continue
                started = clock() if calls.auto else 0.0
                try:
                    reply = handler(data, ctx)
                except KeyboardInterrupt:
                    raise
                except BaseException:  # SystemExit too: this datagram's failure only
                    self._handler_failed(addr)
                    continue
                finally:
                    if started:
                        calls.took(started)
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
        task = start_task(self.loop, self._answer_async(data, ctx), self._hub)
        if task is None:
            return  # started eagerly, and answered already
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
            reply = await self.calls.call(self.loop, data, ctx)
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
