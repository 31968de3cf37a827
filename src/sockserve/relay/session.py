"""One relayed stream connection: the client's (a server session) joined to its TARGET's.

The client side is a :class:`~sockserve._engine.stream.SessionProtocol` the server's accept
loop built (so limits, access control, TLS termination, the PROXY header and connection
logs are the server's); the target side is :class:`FarSide`, a plain asyncio protocol on
a TCP, Unix, TLS or exec transport.

Both directions obey the same rules:

- **Backpressure**: a side's reading pauses while the other side's write buffer is above
  its high-water mark and resumes below the low one, so a side that never reads holds at
  most one buffer's worth (plus a read) of memory here, whatever the other sends.
- **Half-close**: an EOF from one side becomes a FIN (``shutdown(SHUT_WR)``) towards the
  other, which may go on sending; the connection closes once both have ended. TLS has no
  half-close in asyncio: there an EOF closes that side after its data is flushed.
- **Reset**: a side that ends with a reset (``ECONNRESET``) makes the relay abort the
  other side with SO_LINGER 0, so it sees a reset too, as through a router.
- **Connect failure** (refused, unreachable, the connect timeout, a program that cannot
  start): logged once naming the target and the error, and the client is reset, as
  socat and HAProxy do. Only that connection ends.

Toxics (faults) go through a :class:`~sockserve.relay.pipes.StreamPipe` per direction,
only while one applies; otherwise bytes go straight to the other transport.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._engine.stream import set_linger_zero
from ..config import ServerConfig
from ..framing.proxy import encode_v1, encode_v2
from ..logs import fmt_peer, trace
from ..service import StreamConnection, StreamSession
from .exec import ExecChild, spawn
from .target import Origin, Target, connect

relay_log = logging.getLogger("sockserve.relay")


@dataclass
class RelayStats:
    """Counters of one relay, read by ``--metrics`` and the API at scrape time."""

    connections: int = 0  # accepted and relayed, in all
    open: int = 0  # relayed now
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count
    toxics: dict[str, int] = field(default_factory=dict)  # toxic type -> times applied

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass
class Link:
    """What every session of one relay shares: where to connect, how, and what to count."""

    target: Target
    origin: Origin
    config: ServerConfig
    stats: RelayStats
    send_proxy: int = 0  # 0 off, 1 or 2: the PROXY protocol version sent to the target
    trace: bool = False
    toxics: Any = None  # a ToxicSet, or None: no faults configured
    ssl_context: ssl.SSLContext | None = None  # for tls:// targets


def _is_reset(exc: BaseException | None) -> bool:
    return isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError))


class FarSide(asyncio.Protocol):
    """The target's side of one relayed connection; it reports everything to the session."""

    def __init__(self, session: RelaySession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t: asyncio.Transport = transport  # type: ignore[assignment]
        cfg = self.session.link.config
        t.set_write_buffer_limits(cfg.write_high_water, cfg.write_low_water)
        self.transport = t

    def data_received(self, data: bytes) -> None:
        self.session.from_target(data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.session.target_eof()

    def pause_writing(self) -> None:
        self.session.conn_pause()

    def resume_writing(self) -> None:
        self.session.conn_resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.session.target_lost(exc)

    # what the session and the pipes call
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return True
        if t.can_write_eof():
            t.write_eof()
            return True
        return False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        if self.transport is not None:
            set_linger_zero(self.transport)
            self.transport.abort()


class RelaySession(StreamSession):
    """A client connection relayed to ``link.target`` (``link`` set per relay, by subclass)."""

    pause_on_full = False
    link: ClassVar[Link]

    def __init__(self, conn: StreamConnection) -> None:
        super().__init__(conn)
        self.far: FarSide | None = None
        self.child: ExecChild | None = None
        self.held: list[bytes] = []  # client bytes before the target is joined
        self.joined = False  # connected, PROXY header sent: client bytes may flow
        self.client_eof = False
        self.done = False
        self.opening: asyncio.Future[None] | None = None
        self.up: Any = None  # StreamPipe client -> target, while a toxic applies
        self.down: Any = None  # StreamPipe target -> client

    # -- the client side (the engine calls these) ----------------------------------------

    def on_connect(self) -> None:
        st = self.link.stats
        st.connections += 1
        st.open += 1
        self._pause_client()
        self.opening = asyncio.ensure_future(self._open())

    def on_data(self, data: bytes) -> None:
        self.link.stats.bytes_up += len(data)
        if self.link.trace:
            trace(self.conn.ctx.local, self.conn.ctx.peer, "relayed to target from", data)
        if not self.joined:
            self.held.append(data)
        elif self.up is not None and not self.up.passthrough:
            self.up.feed(data)
        elif self.far is not None:
            self.far.write(data)

    def on_eof(self) -> None:
        self.client_eof = True
        far = self.far
        if far is None or not self.joined:
            return  # passed on once joined
        if self.up is not None and not self.up.passthrough:
            self.up.feed_eof()
        elif not far.write_eof():
            far.close()  # TLS: no half-close; flush and close
        if far.eof or far.gone:
            self.conn.close()

    def on_writable(self) -> None:
        """The client's buffer drained: read the target again."""
        far = self.far
        if far is not None and far.transport is not None and not far.eof and not far.gone:
            far.transport.resume_reading()

    def on_close(self) -> None:
        self.done = True
        self.link.stats.open -= 1
        lost = getattr(self.conn, "lost", None)
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()
        for pipe in (self.up, self.down):
            if pipe is not None:
                pipe.close()
        far = self.far
        if far is not None and not far.gone:
            if _is_reset(lost):
                self.link.stats.error("client_reset")
                far.reset()
            else:
                far.close()
        if self.child is not None:
            self.child.close()

    # -- opening the target ---------------------------------------------------------------

    async def _open(self) -> None:
        link = self.link
        peer = self.conn.ctx.peer
        try:
            if link.target.endpoint is None:
                _, _, child = await spawn(link.target.command, peer, self._far)
                self.child = child
            else:
                await connect(link.target, self._far, link.origin, link.ssl_context)
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                why = f"no connection within {link.origin.connect_timeout:g}s (--connect-timeout)"
            else:
                why = str(exc) or type(exc).__name__
            link.stats.error("connect")
            relay_log.warning(
                "%s: cannot connect to %s for %s: %s; closing the client",
                self.conn.ctx.local,
                link.target,
                fmt_peer(peer),
                why,
                extra={"event": "connect_failed", "endpoint": self.conn.ctx.local},
            )
            self._reset_client()
            return
        if self.done:  # the client left while we connected
            if self.far is not None:
                self.far.close()
            if self.child is not None:
                self.child.close()
            return
        self._joined()

    def _far(self) -> FarSide:
        self.far = FarSide(self)
        return self.far

    def _joined(self) -> None:
        """The target is connected: send the PROXY header, what the client sent, resume."""
        far = self.far
        assert far is not None
        link = self.link
        if link.send_proxy:
            far.write(self._proxy_header())
        self.joined = True
        held, self.held = self.held, []
        for chunk in held:
            self.on_data_held(chunk)
        if self.client_eof:
            self.client_eof = False
            self.on_eof()
        else:
            self.conn_resume()

    def on_data_held(self, data: bytes) -> None:
        if self.up is not None and not self.up.passthrough:
            self.up.feed(data)
        elif self.far is not None:
            self.far.write(data)

    def _proxy_header(self) -> bytes:
        src = self.conn.ctx.peer
        dst: Any = getattr(self.conn, "get_extra_info", lambda _: None)("sockname")
        inet = isinstance(src, tuple) and isinstance(dst, tuple)
        s = (str(src[0]), int(src[1])) if inet else None
        d = (str(dst[0]), int(dst[1])) if inet else None
        if s is not None and d is not None and (":" in s[0]) != (":" in d[0]):
            s = d = None  # mixed families cannot be written: say "unknown"/LOCAL
        return encode_v2(s, d) if self.link.send_proxy == 2 else encode_v1(s, d)

    # -- the target side (FarSide calls these) --------------------------------------------

    def from_target(self, data: bytes) -> None:
        self.link.stats.bytes_down += len(data)
        if self.link.trace:
            trace(self.conn.ctx.local, self.conn.ctx.peer, "relayed from target to", data)
        if self.down is not None and not self.down.passthrough:
            self.down.feed(data)
        else:
            self.to_client(data)

    def to_client(self, data: bytes) -> None:
        self.conn.write(data)
        far = self.far
        if not self.conn.writable and far is not None and far.transport is not None:
            far.transport.pause_reading()  # resumed by on_writable

    def target_eof(self) -> bool:
        """The target half-closed: FIN to the client; True keeps the target open for writes."""
        if self.down is not None and not self.down.passthrough:
            self.down.feed_eof()
        else:
            self.client_shutdown()
        far = self.far
        return (
            far is not None
            and not self.client_eof
            and far.transport is not None
            and (far.transport.can_write_eof())
        )

    def client_shutdown(self) -> None:
        if self.client_eof or not self.conn.shutdown_write():
            self.conn.close()

    def target_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        if _is_reset(exc):
            self.link.stats.error("target_reset")
            self._reset_client()
            return
        self.conn.close()  # flush what the target sent; FIN

    def conn_pause(self) -> None:
        """The target's buffer is full: stop reading the client."""
        self._pause_client()

    def conn_resume(self) -> None:
        if not self.client_eof and not self.done:
            resume = getattr(self.conn, "resume_reading", None)
            if resume is not None:
                resume()

    def _pause_client(self) -> None:
        pause = getattr(self.conn, "pause_reading", None)
        if pause is not None:
            pause()

    def _reset_client(self) -> None:
        reset = getattr(self.conn, "reset", None)
        if reset is not None:
            reset()
        else:
            self.conn.close()


def session_class(link: Link) -> type[RelaySession]:
    """A :class:`RelaySession` bound to ``link``: what the relay's Service streams with."""
    return type("RelaySession", (RelaySession,), {"link": link})
