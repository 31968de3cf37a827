"""Two stream sockets joined on the epoll hub, each an :class:`End`: what one reads goes
to the other inside the hub's poll (the fast path's KIND_PUMP: C ``_speedups_c/pump.c``,
twin ``_engine/fastpath.serve_pump``); what the other does not take is held here, its
source not read meanwhile. The relay's pump (``relay/pump.py``) is its owner.

Engine-level code (the hub's members) kept out of ``_engine/``, which is full.

Error handling: a failed read, send or shutdown resets the pair through its owner.
Resource handling: at most one read (or a pipe's worth) held per direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from typing import Any, Protocol

from .._engine.epoll import _ERR, _IN, _OUT
from .._engine.fastio import EOF, ERRNO, KIND_PUMP, PARTIAL, PUMP_STATE
from .._engine.fastpath import serve_pump
from ..endpoints import Endpoint

_LINGER_ZERO = struct.pack("ii", 1, 0)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class PairOwner(Protocol):
    """What the two ends of a pair report to (the relay's Pump)."""

    hub: Any
    closing: bool

    def close(self) -> None: ...
    def abort(self) -> None: ...
    def reset(self, exc: OSError, failed: Any = None) -> None: ...  # failed: the End
    def finish(self, exc: Exception | None) -> None: ...
    def check_done(self) -> None: ...


class End:
    """One socket of a joined pair, a member of the hub: its readable bytes go to its peer
    (the pump, on the fast path); it holds what its peer read for it but it did not take."""

    __slots__ = (
        "events",
        "fd",
        "out",
        "parked",
        "peer",
        "pipe",
        "pipe_paused",
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

    def __init__(self, pump: PairOwner, sock: socket.socket) -> None:
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
        #: Once a toxic applies: its bytes go through this StreamPipe, read in Python.
        self.pipe: Any = None
        self.pipe_paused = False

    def join(self, peer: End, splice_after: int) -> None:
        self.peer = peer
        self.spec = (self, peer.fd, self.state, splice_after, KIND_PUMP)

    def start(self) -> None:
        """Joined: into the hub's set, read on its fast path from now on."""
        self.events = _IN
        self.pump.hub.add(self.fd, self, _IN)

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
            # EPIPE only comes of sending: the peer failed; anything else of reading here.
            failed = self.peer if value == errno.EPIPE else self
            self.pump.reset(OSError(value, os.strerror(value)), failed)

    def on_event(self, events: int) -> None:
        if events & _OUT and self.held:
            self.flush()
        if self.fd < 0:
            return
        if events & (_IN | _ERR) and self.reading and self.pipe is not None:
            self.read_piped()
        elif events & (_IN | _ERR) and self.reading and self.spec is not None:
            tag, value = serve_pump(self.fd, self.spec, self.spec[3])
            if tag:
                self.on_fast_result(tag, value)
        elif events & _ERR:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.pump.reset(OSError(err, os.strerror(err)), self)
            elif self.held:
                self.flush()  # fails: the far end is gone
            else:
                self.park()

    # -- moving what is held ------------------------------------------------------------

    def flush(self) -> None:
        """Send what is held for this socket; once all has gone, read its source again."""
        src = self.peer.view
        try:
            if src[4] > 0:  # what waits in the pipe was read before what waits in out
                left = drain_pipe(src[2], self.fd, src[4])
                src[0] += src[4] - left
                src[4] = left
            if self.out is not None and not src[4]:
                sent = send_some(self.fd, self.out)
                src[0] += sent
                self.out = self.out[sent:] or None
        except OSError as exc:
            self.pump.reset(exc, self)
            return
        if self.held:
            return
        if self.shut_after:
            self.shut_write()
        if self.fd < 0:
            return
        if self.pump.closing:
            self.pump.close()  # closes once neither end holds anything
            return
        self.peer.resume()
        self.update()

    def resume(self) -> None:
        """Read this source again, unless something still holds it back."""
        if not (self.read_eof or self.pump.closing or self.pipe_paused or self.peer.held):
            self.reading = True
            self.update()

    # -- through toxics (a StreamPipe per direction) --------------------------------------

    def read_piped(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.pump.reset(exc, self)
            return
        assert self.pipe is not None
        if not data:
            self.read_eof = True
            self.reading = False
            self.update()
            self.pipe.feed_eof()
            return
        self.pipe.feed(data)

    def pipe_pause(self) -> None:
        self.pipe_paused = True
        self.reading = False
        self.update()

    def pipe_resume(self) -> None:
        self.pipe_paused = False
        self.resume()

    def send(self, data: bytes) -> None:
        """What the pipe into this socket lets through: sent, or held (its source paused)."""
        if self.fd < 0 or not data:
            return
        if self.held:
            self.out = (self.out or b"") + data
        else:
            try:
                sent = send_some(self.fd, data)
            except OSError as exc:
                self.pump.reset(exc, self)
                return
            self.peer.view[0] += sent
            self.out = data[sent:] or None
        if self.out is not None:
            self.peer.reading = False
            self.peer.update()
            self.update()

    def shut_write(self) -> None:
        """Its peer's stream ended: pass the FIN on (half-close)."""
        self.wrote_eof = True
        self.shut_after = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the far end is already gone
            self.pump.reset(exc, self)
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


def send_some(fd: int, data: bytes) -> int:
    done = 0
    view = memoryview(data)
    while done < len(data):
        try:
            done += os.write(fd, view[done:])
        except BlockingIOError:
            break
    return done


def drain_pipe(pipe_r: int, fd: int, left: int) -> int:
    while left > 0:
        try:
            left -= os.splice(pipe_r, fd, left, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            break
    return left


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
