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
  half-close in asyncio: the client's EOF leaves a TLS target open (its reply still comes
  back) until the target closes or the idle timeout; the target's EOF closes a TLS client
  after its data is flushed (a server's EOF usually ends the exchange).
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
from typing import Any, ClassVar

from ..framing.proxy import encode_v1, encode_v2
from ..logs import fmt_peer, trace
from ..service import StreamConnection, StreamSession
from .pipes import StreamPipe
from .target import ExecChild, FarSide, Link, RelayStats, connect, spawn
from .toxics import ToxicSet

relay_log = logging.getLogger("sockserve.relay")

__all__ = ["Link", "RelaySession", "RelayStats", "session_class"]


def _is_reset(exc: BaseException | None) -> bool:
    return isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError))


class RelaySession(StreamSession):
    """A client connection relayed to ``link.target`` (``link`` set per relay, by subclass).

    Each direction ends in a sink (``_Up``: the target, ``_Down``: the client); a direction
    with toxics feeds its StreamPipe, which writes to the same sink. The connection closes
    once an EOF has been delivered each way (or a toxic closes or resets it).
    """

    pause_on_full = False
    link: ClassVar[Link]

    def __init__(self, conn: StreamConnection) -> None:
        super().__init__(conn)
        self.far: FarSide | None = None
        self.child: ExecChild | None = None
        self.held: list[bytes] = []  # client bytes before the target is joined
        self.joined = False  # connected, PROXY header sent: client bytes may flow
        self.client_eof = False
        self.up_done = False  # EOF delivered to the target
        self.down_done = False  # EOF delivered to the client
        self.done = False
        self.opening: asyncio.Future[None] | None = None
        self.up: StreamPipe | None = None  # client -> target through the toxics
        self.down: StreamPipe | None = None  # target -> client

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
            self._pause_client()  # again: uvloop starts reading after connection_made
        elif self.up is not None and not self.up.passthrough:
            self.up.feed(data)
        elif self.far is not None:
            self.far.write(data)

    def on_eof(self) -> None:
        self.client_eof = True
        if not self.joined:
            return  # passed on once joined
        if self.up is not None and not self.up.passthrough:
            self.up.feed_eof()
        else:
            self.up_eof()

    def on_writable(self) -> None:
        """The client's buffer drained: read the target again."""
        self._resume_far()

    def on_close(self) -> None:
        self.done = True
        st = self.link.stats
        st.open -= 1
        lost = getattr(self.conn, "lost", None)
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()
        for pipe in (self.up, self.down):
            if pipe is not None:
                for kind, n in pipe.applied.items():
                    st.toxics[kind] = st.toxics.get(kind, 0) + n
                pipe.close()
        far = self.far
        if far is not None and not far.gone:
            if _is_reset(lost):
                st.error("client_reset")
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
            self.reset()
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
        if self.link.toxics is not None:
            self._pipes(self.link.toxics)  # now: the target may send before _open resumes
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
            if self.up is not None and not self.up.passthrough:
                self.up.feed(chunk)
            else:
                far.write(chunk)
        if self.client_eof:
            self.on_eof()
        else:
            self.conn_resume()

    def _pipes(self, toxics: ToxicSet) -> None:
        """A StreamPipe each way: toxics there now, or added later, reach this connection."""
        loop = asyncio.get_running_loop()
        high = self.link.config.write_high_water
        self.up = StreamPipe(
            loop, toxics, "upstream", _Up(self), pause=self._pause_client,
            resume=self.conn_resume, high_water=high,
        )  # fmt: skip
        self.down = StreamPipe(
            loop, toxics, "downstream", _Down(self), pause=self._pause_far,
            resume=self._resume_far, high_water=high,
        )  # fmt: skip

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

    def target_eof(self) -> bool:
        """The target half-closed: FIN to the client; True keeps the target open for writes."""
        if self.down is not None and not self.down.passthrough:
            self.down.feed_eof()
        else:
            self.down_eof()
        far = self.far
        return (
            far is not None
            and not self.up_done
            and far.transport is not None
            and far.transport.can_write_eof()
        )

    def target_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        if _is_reset(exc):
            self.link.stats.error("target_reset")
            self.reset()
        elif self.down is not None and not self.down.passthrough and not self.down_done:
            if self.far is not None and not self.far.eof:
                self.down.feed_eof()  # what the toxics hold still goes, then the close
        else:
            self.conn.close()  # flush what the target sent; FIN

    # -- the two sinks' ends (also what the pipes reach through _Up and _Down) ----------

    def to_client(self, data: bytes) -> None:
        self.conn.write(data)
        if not self.conn.writable:
            self._pause_far()  # resumed by on_writable

    def up_eof(self) -> None:
        """EOF towards the target. A TLS target has none: it is kept open, not closed, so
        the reply a half-closing client awaits still arrives; it ends when the target
        closes (or by the idle timeout)."""
        self.up_done = True
        far = self.far
        if self.down_done or (far is not None and far.gone):
            self.finish()
        elif far is not None:
            far.write_eof()  # False on TLS: nothing to send, the target stays open

    def down_eof(self) -> None:
        """EOF towards the client (a plain close on TLS)."""
        self.down_done = True
        far = self.far
        if self.up_done or (far is not None and far.gone):
            self.finish()
        elif not self.conn.shutdown_write():
            self.conn.close()

    def finish(self) -> None:
        """Both ways are done: close both sides after what is buffered."""
        self.conn.close()
        if self.far is not None:
            self.far.close()

    def reset(self) -> None:
        """Reset both sides (a reset passed on, a connect failure, a reset_peer toxic)."""
        if self.far is not None and not self.far.gone:
            self.far.reset()
        reset = getattr(self.conn, "reset", None)
        if reset is not None:
            reset()
        else:
            self.conn.close()

    # -- flow control --------------------------------------------------------------------

    def conn_pause(self) -> None:
        """The target's buffer is full: stop reading the client."""
        self._pause_client()

    def conn_resume(self) -> None:
        """Read the client again, unless the target's buffer or the toxics still hold too much."""
        far, up = self.far, self.up
        if self.client_eof or self.done or (far is not None and far.full):
            return
        if up is not None and up.paused:
            return
        resume = getattr(self.conn, "resume_reading", None)
        if resume is not None:
            resume()

    def _pause_client(self) -> None:
        pause = getattr(self.conn, "pause_reading", None)
        if pause is not None:
            pause()

    def _pause_far(self) -> None:
        far = self.far
        if far is not None and far.transport is not None and not far.gone:
            far.transport.pause_reading()

    def _resume_far(self) -> None:
        far, down = self.far, self.down
        if far is None or far.transport is None or far.eof or far.gone:
            return
        if not self.conn.writable or (down is not None and down.paused):
            return
        far.transport.resume_reading()


class _Up:
    """The upstream pipe's sink: the target."""

    def __init__(self, session: RelaySession) -> None:
        self.s = session

    def write(self, data: bytes) -> None:
        if self.s.far is not None:
            self.s.far.write(data)

    def write_eof(self) -> None:
        self.s.up_eof()

    def close(self) -> None:
        self.s.finish()

    def reset(self) -> None:
        self.s.reset()


class _Down(_Up):
    """The downstream pipe's sink: the client."""

    def write(self, data: bytes) -> None:
        self.s.to_client(data)

    def write_eof(self) -> None:
        self.s.down_eof()


def session_class(link: Link) -> type[RelaySession]:
    """A :class:`RelaySession` bound to ``link``: what the relay's Service streams with."""
    return type("RelaySession", (RelaySession,), {"link": link})
