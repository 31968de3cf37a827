"""PROXY protocol on stream endpoints: read the header first, then hand the connection on.

A :class:`ProxyHeaderProtocol` owns a new connection until its PROXY header is
read (within ``proxy_header_timeout``). It then checks the real client against
``--allow``/``--deny``, builds the normal protocol with the real client as
``ctx.peer`` (and the address the client connected to as ``ctx.local``), swaps
it in with ``transport.set_protocol`` and feeds it the bytes that followed the
header, so the engine's per-request code is untouched.

Error handling: a missing, malformed or late header closes the connection with
a logged reason naming the proxy's address; nothing reaches the service.
Resource handling: at most one header (107 bytes for v1, 64 KiB for v2) is
buffered per connection, and the timer is cancelled on every exit path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ..endpoints import Endpoint
from ..errors import RemoteProtocolError
from ..framing.proxy import ProxyHeader, ProxyHeaderReader
from ..logs import conn_log, fmt_peer, server_log
from .contracts import CloseReason, ConnOwner
from .guards import AccessControl
from .stream import AnyConn, TransportConn

if TYPE_CHECKING:
    from ..config import ServerConfig


def warn_settings(endpoint: Endpoint, config: ServerConfig) -> None:
    """Log at start what ``--proxy-protocol`` leaves open on this endpoint, so nobody relies on it.

    Without ``--proxy-from`` any client that reaches an IP endpoint can send a header
    naming any address, and so pass ``--allow``/``--deny``. ``--proxy-from`` cannot apply
    to a Unix listener (its peers have no address; the file mode decides), and datagram
    endpoints take no header at all.
    """
    if not config.proxy_protocol:
        return
    why = None
    if not endpoint.is_stream:
        why = (
            "--proxy-protocol applies to stream endpoints only: datagrams here are judged "
            "by their own source address (--allow/--deny), --proxy-from does not apply"
        )
    elif endpoint.is_unix and config.proxy_from:
        why = (
            "--proxy-from cannot apply to a Unix socket (its peers have no address): "
            "the socket file's mode (--unix-mode) decides who may send PROXY headers"
        )
    elif not endpoint.is_unix and not config.proxy_from:
        why = (
            "--proxy-protocol without --proxy-from: any client that can connect can claim "
            "any address in its PROXY header, and so pass --allow/--deny; list your "
            "proxies with --proxy-from CIDR"
        )
    if why is not None:
        server_log.warning(
            "%s: %s", endpoint, why, extra={"event": "proxy_warning", "endpoint": endpoint}
        )


def wrap_factory(
    rt: ConnOwner, inner: Callable[[Any], AnyConn]
) -> Callable[[Any], ProxyHeaderProtocol]:
    """A protocol factory that reads the PROXY header before building ``inner``'s protocol."""
    access = AccessControl(rt.config.allow, rt.config.deny)
    return lambda peer: ProxyHeaderProtocol(rt, peer, inner, access)


class ProxyHeaderProtocol(TransportConn):
    """Holds a connection until its PROXY header is read: a connection to its owner
    meanwhile (drained, swept for idleness, counted), not yet logged as opened."""

    __slots__ = ("_access", "_inner", "_proxy_gate", "_reader", "_timer")

    def __init__(
        self,
        rt: ConnOwner,
        peer: Any,
        inner: Callable[[Any], AnyConn],
        access: AccessControl,
    ) -> None:
        super().__init__(rt, peer)
        self._inner = inner
        self._access = access
        #: The accept gate was an explicit --proxy-from list (an IP listener checked it).
        self._proxy_gate = bool(rt.config.proxy_from)
        self._reader = ProxyHeaderReader()
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        # Tracked like a connection (drain, idle sweep, connection count) but not logged
        # as opened: the open line names the real client once the header is read.
        self.rt.hold(self)
        timeout = self.rt.config.proxy_header_timeout
        self._timer = self.rt.loop.call_later(timeout, self._refuse, f"none within {timeout:g}s")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            header = self._reader.feed(data)
        except RemoteProtocolError as exc:
            self._refuse(str(exc))
            return
        if header is None:
            return
        self._cancel_timer()
        peer = header.source if header.source is not None else self.ctx.peer
        refusal = self._judge(header, peer)
        if refusal is not None:
            conn_log.info(
                "%s: denied %s (via proxy %s)%s",
                self.rt.endpoint,
                fmt_peer(peer),
                fmt_peer(self.ctx.peer),
                refusal,
                extra={"event": "denied", "endpoint": self.rt.endpoint, "peer": fmt_peer(peer)},
            )
            self.rt.note_close_reason(self, CloseReason.DENIED)
            self.abort()
            return
        self._hand_over(peer, header.destination)

    def _judge(self, header: ProxyHeader, peer: Any) -> str | None:
        """``None`` to admit, else why not (appended to the log line).

        - A relayed client named by IP address: ``--allow``/``--deny`` judge that address.
        - A relayed client the header does not name by IP (v1 ``UNKNOWN``, v2 ``UNSPEC``,
          a Unix path): no rule can match it, so it is refused while any rule exists.
        - v2 ``LOCAL`` (the proxy's own health check): judged as the same connection
          without a header would be. A proxy let in by ``--proxy-from`` is trusted for it
          (it could name any allowed client anyway); without ``--proxy-from`` the rules
          judge its own address; on a Unix listener the socket file's mode governs.
        """
        access = self._access
        if not access.active:
            return None
        if header.relayed:
            ip = header.client_ip
            if ip is None:
                return f": the PROXY header names no IP address ({header.family}) to check"
            return None if access.permits(ip) else ""
        real = self.ctx.peer
        if not isinstance(real, tuple) or self._proxy_gate:
            return None
        return None if access.permits(real[0]) else ""

    def eof_received(self) -> bool:
        self._refuse("connection closed before a whole header arrived")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.rt.closed(self, exc)  # a no-op once handed over

    # -- the runtime's connection interface (drain, idle sweep) --------------------------

    @property
    def busy(self) -> bool:
        return False

    def drain(self) -> None:
        self.close()

    def abort(self) -> None:
        self._cancel_timer()
        super().abort()

    # -- internals ---------------------------------------------------------------------

    def _hand_over(self, peer: Any, destination: Any) -> None:
        transport = self._transport
        assert transport is not None
        conn = self._inner(peer)
        if isinstance(destination, tuple):
            conn.ctx.local = Endpoint(
                self.rt.endpoint.scheme, host=destination[0], port=destination[1]
            )
        self.rt.release(self)  # the real protocol takes the slot
        transport.set_protocol(conn)
        conn.connection_made(transport)
        rest = self._reader.rest
        if rest and not conn.closing:
            conn.data_received(rest)

    def _refuse(self, why: str) -> None:
        self._cancel_timer()
        self.rt.note_close_reason(self, CloseReason.PROXY, why)
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
