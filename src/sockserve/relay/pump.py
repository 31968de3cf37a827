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
(:mod:`.session`) does the rest. A toxic added to the live set while a connection is
pumped moves it off the fast path: its bytes then go through a StreamPipe each way
(:mod:`.pipes`), as on the session path.

Error handling: a failed read or send on either side resets both (SO_LINGER 0), so a
reset passes as a reset; a target that cannot be reached resets the client, logged once
naming it. Resource handling: what a side does not take is held (one read, or what
waits in the pipe) and its source is not read until it has gone: bounded memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..logs import fmt_peer
from ..server.pair import End, open_stream
from ..service import Context
from .pipes import StreamPipe

if TYPE_CHECKING:
    from .session import Link

relay_log = logging.getLogger("sockserve.relay")

#: A direction splices once it has moved this much in big reads: below it a pipe's two
#: extra descriptors and system calls per chunk cost more than the copy they save.
SPLICE_AFTER = 1 << 20
#: splice_after that never splices (``SOCKSERVE_RELAY_SPLICE=0``, to compare).
NEVER = sys.maxsize


class _Into:
    """The Sink of a StreamPipe: the socket its direction ends in."""

    def __init__(self, end: End, pump: Pump) -> None:
        self.end = end
        self.pump = pump

    def write(self, data: bytes) -> None:
        self.end.send(data)

    def write_eof(self) -> None:
        if self.end.held:
            self.end.shut_after = True
        elif not self.end.wrote_eof and self.end.fd >= 0:
            self.end.shut_write()

    def close(self) -> None:
        self.pump.close()

    def reset(self) -> None:
        self.pump.reset(ConnectionResetError("reset by a toxic"), None, count=False)


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
        self.piped = False
        toxics = link.toxics
        self._unwatch = toxics.watch(self.toxics_changed) if toxics is not None else None
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
        client.start()
        target.start()
        self.toxics_changed()

    def toxics_changed(self) -> None:
        """A toxic was added to the relay's live set: from now on this connection's bytes
        go through a StreamPipe each way, which follows the set from here (Toxiproxy
        applies toxics to open connections too)."""
        toxics = self.link.toxics
        if self.piped or self.done or self.target is None or toxics is None or not len(toxics):
            return
        self.piped = True
        loop = self.rt.loop
        for src, direction in ((self.client, "upstream"), (self.target, "downstream")):
            src.pipe = StreamPipe(
                loop,
                toxics,
                direction,  # type: ignore[arg-type]
                _Into(src.peer, self),
                pause=src.pipe_pause,
                resume=src.pipe_resume,
            )
            src.spec = None
            if src.fd >= 0 and not src.parked:
                self.hub.set_fast(src.fd, None)

    # -- ending ---------------------------------------------------------------------------

    def check_done(self) -> None:
        t = self.target
        c = self.client
        if t is not None and c.read_eof and t.wrote_eof and t.read_eof and c.wrote_eof:
            self.finish(None)

    def reset(self, exc: OSError, failed: Any = None, count: bool = True) -> None:
        """A side failed (a reset, mostly): reset both, so the other sees it too; counted
        as the session path counts it (``target_reset``, ``client_reset``)."""
        if count:
            self.link.stats.error("target_reset" if failed is self.target else "client_reset")
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
        if self._unwatch is not None:
            self._unwatch()
        applied = self.link.stats.toxics
        for end in (self.client, self.target):
            if end is not None and end.pipe is not None:
                end.pipe.close()
                for kind, times in end.pipe.applied.items():
                    applied[kind] = applied.get(kind, 0) + times
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


def adopter(link: Link) -> Callable[[Any, Any, socket.socket, Any], bool]:
    """The ``Service.adopt`` hook of a plain relay: each accepted socket is pumped while
    no toxic is configured (else, and for its lifetime, the session path relays it)."""
    ep = link.target.endpoint
    assert ep is not None
    splice_after = NEVER if os.environ.get("SOCKSERVE_RELAY_SPLICE") == "0" else SPLICE_AFTER

    def adopt(rt: Any, hub: Any, sock: socket.socket, peer: Any) -> bool:
        if link.toxics is not None and len(link.toxics):
            return False  # toxics from the start: the session path
        Pump(rt, hub, sock, peer, link, lambda: open_stream(ep), splice_after)
        return True

    return adopt
