"""The relay's fast path: a plain client socket and its target's joined on the server's
epoll hub, their bytes moved inside the hub's poll (C ``_speedups_c/pump.c``, or its
twin ``_engine/fastpath.serve_pump``), never through asyncio transports or Python per
chunk.

Why: a relayed request crosses the relay twice, and on loopback each crossing through
transports costs a loop turn, a ``data_received`` and a ``write`` in Python; here it is
a ``recv`` and a ``send`` inside the batch the hub is already draining. Bulk directions
switch to ``splice(2)`` through a pipe (the bytes stay in the kernel).

Taken only for plain pairs (``tcp``/``unix`` on both sides, no TLS, no PROXY header
either way, no ``--trace``, no toxic at accept time): the session path
(:mod:`.session`) does the rest. A toxic added later applies to new connections; a
pumped one keeps passing bytes untouched.

Error handling: a failed read or send on either side resets both (SO_LINGER 0), so a
reset passes as a reset; a target that cannot be reached resets the client, logged once
naming it. Resource handling: what a side does not take is held (one read, or what
waits in the pipe) and its source is not read until it has gone: bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._engine.epoll import _ERR, _IN, _OUT
from .._engine.fastio import EOF, ERRNO, KIND_PUMP, PARTIAL, PUMP_STATE
from .._engine.fastpath import serve_pump
from ..endpoints import Endpoint
from ..logs import fmt_peer
from ..service import Context

if TYPE_CHECKING:
    from .session import Link

relay_log = logging.getLogger("sockserve.relay")

#: A direction splices once it has moved this much in big reads: below it a pipe's two
#: extra descriptors and system calls per chunk cost more than the copy they save.
SPLICE_AFTER = 1 << 20
#: splice_after that never splices (``SOCKSERVE_RELAY_SPLICE=0``, to compare).
NEVER = sys.maxsize
_LINGER_ZERO = struct.pack("ii", 1, 0)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class End:
    """One socket of a pumped pair, a member of the hub: its readable bytes go to its peer
    (the pump, on the fast path); it holds what its peer read for it but it did not take."""

    __slots__ = (
        "events",
        "fd",
        "out",
        "parked",
        "peer",
        "pump",
        "read_eof",
        "reading",
        "shut_after",
        "sock",
        "spec",
        "state",
        "view",
        "wrote_eof",
    )

    def __init__(self, pump: Pump, sock: socket.socket) -> None:
        self.pump = pump
        self.sock = sock
        self.fd = sock.fileno()
        #: The direction this socket is the source of (the contract's KIND_PUMP state).
        self.state = bytearray(PUMP_STATE)
        self.view = memoryview(self.state).cast("q")
        self.view[2] = self.view[3] = -1
        self.peer = self
        self.spec: tuple[End, int, bytearray, int, int] | None = None
        self.events = 0
        self.out: bytes | None = None
        self.reading = True
        self.read_eof = False
        self.shut_after = False  # its peer ended: shut this side's write once out is gone
        self.wrote_eof = False
        self.parked = False  # out of the epoll set (hung up while not read)

    def join(self, peer: End, splice_after: int) -> None:
        self.peer = peer
        self.spec = (self, peer.fd, self.state, splice_after, KIND_PUMP)

    def fast_spec(self) -> tuple[End, int, bytearray, int, int] | None:
        """The hub serves this socket's reads itself while it is only read (events IN)."""
        return self.spec

    @property
    def held(self) -> bool:
        """Bytes for this socket not sent yet (its own, or in its peer's pipe)."""
        return self.out is not None or self.peer.view[4] > 0

    # -- what the hub calls -------------------------------------------------------------

    def on_fast_result(self, tag: int, value: Any) -> None:
        if tag == PARTIAL:  # the peer did not take it all: hold it, stop reading here
            if value is not None:
                self.peer.out = value
            self.reading = False
            self.update()
            self.peer.update()
        elif tag == EOF:
            self.read_eof = True
            self.reading = False
            self.update()
            if self.peer.held:
                self.peer.shut_after = True
            else:
                self.peer.shut_write()
        elif tag == ERRNO:
            self.pump.reset(OSError(value, os.strerror(value)))

    def on_event(self, events: int) -> None:
        if events & _OUT and self.held:
            self.flush()
        if self.fd < 0:
            return
        if events & (_IN | _ERR) and self.reading and self.spec is not None:
            tag, value = serve_pump(self.fd, self.spec, self.spec[3])
            if tag:
                self.on_fast_result(tag, value)
        elif events & _ERR:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.pump.reset(OSError(err, os.strerror(err)))
            elif self.held:
                self.flush()  # fails: the far end is gone
            else:
                self.park()

    # -- moving what is held ------------------------------------------------------------

    def flush(self) -> None:
        """Send what is held for this socket; once all has gone, read its source again."""
        src = self.peer.view
        try:
            if self.out is not None:
                sent = _send_some(self.fd, self.out)
                src[0] += sent
                self.out = self.out[sent:] or None
            if self.out is None and src[4] > 0:
                left = _drain(src[2], self.fd, src[4])
                src[0] += src[4] - left
                src[4] = left
        except OSError as exc:
            self.pump.reset(exc)
            return
        if self.held:
            return
        if self.shut_after:
            self.shut_write()
        elif not self.peer.read_eof and not self.pump.closing:
            self.peer.reading = True
            self.peer.update()
        elif self.pump.closing:
            self.pump.finish(None)
            return
        self.update()

    def shut_write(self) -> None:
        """Its peer's stream ended: pass the FIN on (half-close)."""
        self.wrote_eof = True
        self.shut_after = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the far end is already gone
            self.pump.reset(exc)
            return
        self.update()
        self.pump.check_done()

    # -- the epoll set ------------------------------------------------------------------

    def update(self) -> None:
        if self.fd < 0:
            return
        want = (_IN if self.reading else 0) | (_OUT if self.held else 0)
        if self.parked:
            if want:
                self.parked = False
                self.events = want
                self.pump.hub.add(self.fd, self, want)
        elif want != self.events:
            self.events = want
            self.pump.hub.modify(self.fd, want)

    def park(self) -> None:
        """Hung up while not read and holding nothing: out of the set (a hang-up is
        reported whatever the events, level-triggered: it would spin)."""
        if not self.parked:
            self.parked = True
            self.pump.hub.remove(self.fd)

    def abort(self) -> None:
        self.pump.abort()  # the hub's word for a member that failed

    def close(self, linger_zero: bool) -> None:
        if self.fd < 0:
            return
        if not self.parked:
            self.pump.hub.remove(self.fd)
        self.fd = -1
        for pipe_fd in (self.view[2], self.view[3]):
            if pipe_fd >= 0:
                os.close(pipe_fd)
        self.view[2] = self.view[3] = -1
        if linger_zero:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        self.sock.close()


def _send_some(fd: int, data: bytes) -> int:
    done = 0
    view = memoryview(data)
    while done < len(data):
        try:
            done += os.write(fd, view[done:])
        except BlockingIOError:
            break
    return done


def _drain(pipe_r: int, fd: int, left: int) -> int:
    while left > 0:
        try:
            left -= os.splice(pipe_r, fd, left, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            break
    return left


Connect = Callable[[], Any]  # () -> awaitable of a connected non-blocking socket


class Pump:
    """One relayed connection on the pump: to its runtime, a connection like any other
    (:class:`~sockserve._engine.contracts.Conn`)."""

    def __init__(
        self,
        rt: Any,
        hub: Any,
        sock: socket.socket,
        peer: Any,
        link: Link,
        connect: Connect,
        splice_after: int = SPLICE_AFTER,
    ) -> None:
        self.rt = rt
        self.hub = hub
        self.link = link
        self.ctx = Context(peer, rt.endpoint)
        self.client = End(self, sock)
        self.target: End | None = None
        self.splice_after = splice_after
        self.closing = False
        self.done = False
        self.idle_since = 0.0
        self._seen = -1
        self._counted = (0, 0)
        self._task: asyncio.Task[None] | None = None
        link.stats.connections += 1
        link.stats.open += 1
        rt.opened(self)  # drains it at once when the server is stopping
        if not self.done:
            self._task = rt.loop.create_task(self._join(connect))

    # -- what the runtime sees (Conn) ---------------------------------------------------

    @property
    def active(self) -> bool:
        """Bytes moved since the idle sweeper last looked."""
        self.count()
        return sum(self._counted) != self._seen

    @active.setter
    def active(self, value: bool) -> None:
        self._seen = -1 if value else sum(self._counted)

    @property
    def busy(self) -> bool:
        return False

    def drain(self) -> None:
        self.close()

    def close(self) -> None:
        """Read nothing more; close once what is held has gone."""
        self.closing = True
        ends = [e for e in (self.client, self.target) if e is not None]
        if not any(e.held for e in ends):
            self.finish(None)
            return
        for end in ends:
            end.reading = False
            end.update()

    def abort(self) -> None:
        self.finish(None)

    # -- joining ------------------------------------------------------------------------

    async def _join(self, connect: Connect) -> None:
        link = self.link
        try:
            sock = await asyncio.wait_for(connect(), link.origin.connect_timeout)
        except asyncio.CancelledError:
            self._task = None
            self.finish(None)
            raise
        except OSError as exc:
            self._task = None
            if isinstance(exc, TimeoutError):
                why = f"no connection within {link.origin.connect_timeout:g}s (--connect-timeout)"
            else:
                why = str(exc) or type(exc).__name__
            link.stats.error("connect")
            relay_log.warning(
                "%s: cannot connect to %s for %s: %s; closing the client",
                self.ctx.local,
                link.target,
                fmt_peer(self.ctx.peer),
                why,
                extra={"event": "connect_failed", "endpoint": self.ctx.local},
            )
            self.finish(exc, reset=True)
            return
        self._task = None
        if self.done:
            sock.close()
            return
        target = self.target = End(self, sock)
        client = self.client
        client.join(target, self.splice_after)
        target.join(client, self.splice_after)
        for end in (client, target):
            end.events = _IN
            self.hub.add(end.fd, end, _IN)

    # -- ending ---------------------------------------------------------------------------

    def check_done(self) -> None:
        t = self.target
        c = self.client
        if t is not None and c.read_eof and t.wrote_eof and t.read_eof and c.wrote_eof:
            self.finish(None)

    def reset(self, exc: OSError) -> None:
        """A side failed (a reset, mostly): reset both, so the other sees it too."""
        self.link.stats.error("reset")
        self.finish(exc, reset=True)

    def count(self) -> None:
        """Add the bytes moved since last time to the relay's counters."""
        up = self.client.view[0]
        down = self.target.view[0] if self.target is not None else 0
        was_up, was_down = self._counted
        if up != was_up or down != was_down:
            stats = self.link.stats
            stats.bytes_up += up - was_up
            stats.bytes_down += down - was_down
            self._counted = (up, down)

    def finish(self, exc: Exception | None, reset: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self.closing = True
        if self._task is not None:
            self._task.cancel()
        self.count()
        self.client.close(reset)
        if self.target is not None:
            self.target.close(reset)
        self.link.stats.open -= 1
        self.rt.closed(self, exc)


def plain(link: Link) -> bool:
    """Whether a relay's connections may be pumped: a plain tcp/unix target, no PROXY
    header to send, nothing traced (the listener's side the runtime checks: no TLS, no
    PROXY header, the epoll engine)."""
    return (
        link.target.kind in ("tcp", "unix")
        and not link.send_proxy
        and not link.trace
        and os.environ.get("SOCKSERVE_RELAY_PUMP", "1") != "0"
    )


async def open_stream(ep: Endpoint) -> socket.socket:
    """A non-blocking socket connected to a tcp/unix endpoint (each address in turn)."""
    loop = asyncio.get_running_loop()
    if ep.is_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ep.address())
        except BaseException:
            sock.close()
            raise
        return sock
    infos = await loop.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {ep.host}")
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


def adopter(link: Link) -> Callable[[Any, Any, socket.socket, Any], bool]:
    """The ``Service.adopt`` hook of a plain relay: each accepted socket is pumped while
    no toxic is configured (else, and for its lifetime, the session path relays it)."""
    ep = link.target.endpoint
    assert ep is not None
    splice_after = NEVER if os.environ.get("SOCKSERVE_RELAY_SPLICE") == "0" else SPLICE_AFTER

    def adopt(rt: Any, hub: Any, sock: socket.socket, peer: Any) -> bool:
        if link.toxics is not None and len(link.toxics):
            return False
        Pump(rt, hub, sock, peer, link, lambda: open_stream(ep), splice_after)
        return True

    return adopt
