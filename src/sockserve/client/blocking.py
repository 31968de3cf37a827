"""The blocking client: the textbook client made correct (framing, timeouts, typed errors).

Uses only the ``socket`` module (``ssl`` only for tls://), so a one-shot
``sockserve call`` starts fast. ``connect(url)`` returns a reusable client::

    with sockserve.connect("tcp://127.0.0.1:21567") as c:
        print(c.request(b"hello"))

Where a reply ends (the rule ``sockserve call`` documents too):

* ``line``/``length`` framing: the framing says; many requests share one connection.
* ``raw`` with ``reply_size=N``: every reply is exactly N bytes, on one connection.
* ``raw`` otherwise: nothing on the wire marks the end, so each request gets a
  connection of its own: send, half-close, and the reply is everything up to the
  server's close (as ``ncat`` does). A reply is never cut or handed to the wrong
  request; one longer than ``max_message`` raises ReplyTooLarge.
* datagrams: one datagram is one reply (longer than ``max_message``: ReplyTooLarge).

``timeout`` is a deadline for the whole request (connect, send and every read),
not a limit per ``recv``: a server trickling one byte at a time cannot stretch it.

Error handling: OS errors are translated at this edge (wording in
:mod:`sockserve.client.common`) into ConnectError (could not reach, or no
connection within the timeout), RequestTimeout (connected, no reply in time),
ConnectionClosed (the server hung up early), ReplyTooLarge / RequestTooLarge
(sizes), each naming the endpoint; a missing TLS file raises TLSFileError naming
the file. After a failed stream request the connection is closed (the next
request opens another), so a late reply is never taken for the next one's.
"""

from __future__ import annotations

import errno
import os
import time

from ..endpoints import Endpoint
from ..errors import ClientError, ProtocolError
from . import common
from .common import DEFAULT_TIMEOUT, RAW_READ, UDP_FIRST_RETRY, ClientSettings, check_tls_files

TYPE_CHECKING = False  # typing.TYPE_CHECKING without the 6 ms import of typing
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import Any
else:
    # The socket module's C core. The Python layer on top adds enum and selectors, 6 ms of
    # imports, which would more than double a one-shot call's start-up; the client uses
    # nothing from it (ssl, for tls:// only, brings it in when needed).
    import _socket as socket

# check_tls_files: re-exported, cli.bench takes it from here.
__all__ = ["DEFAULT_TIMEOUT", "Client", "check_tls_files", "connect"]


class Client(ClientSettings):
    """A connection to one endpoint. Not thread-safe; one request at a time.

    Takes the options of :class:`~sockserve.client.common.ClientSettings`.
    Resource handling: the socket opens on :meth:`connect` (or the first request)
    and closes on :meth:`close` or leaving the ``with`` block.
    """

    _sock: socket.socket | None = None
    _unlink: str | None = None  # a unixgram client's own socket file, where autobind failed

    # -- connection --------------------------------------------------------------------

    def connect(self) -> Client:
        """Open the connection (no-op when open); ConnectError if it cannot be opened in time."""
        if self._sock is not None:
            return self
        ep = self.endpoint
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            sock = self._connect_unix(ep) if ep.is_unix else self._connect_inet(ep)
            if ep.scheme == "tls":
                sock = self._wrap_tls(sock, deadline)
        except ClientError:
            raise
        except TimeoutError:
            raise common.connect_timed_out(self.name, self.timeout, ep.scheme == "tls") from None
        except OSError as exc:
            raise common.connect_failed(self.name, exc) from None
        self._sock = sock
        return self

    def _connect_unix(self, ep: Endpoint) -> socket.socket:
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM if ep.is_stream else socket.SOCK_DGRAM
        )
        try:
            sock.settimeout(self.timeout)
            if not ep.is_stream:
                self._bind_unixgram(sock)
            sock.connect(ep.address())
        except BaseException:
            sock.close()
            raise
        return sock

    def _connect_inet(self, ep: Endpoint) -> socket.socket:
        socktype = socket.SOCK_STREAM if ep.is_stream else socket.SOCK_DGRAM
        # An ASCII host goes as bytes: a str would load the idna codec (3 ms) for nothing.
        host: str | bytes = ep.host.encode() if ep.host.isascii() else ep.host
        try:
            infos = socket.getaddrinfo(host, ep.port, socket.AF_UNSPEC, socktype)
        except socket.gaierror as exc:
            raise common.cannot_resolve(self.name, ep.host, exc) from None
        last: OSError | None = None
        for family, stype, proto, _, addr in infos:
            sock = socket.socket(family, stype, proto)
            try:
                sock.settimeout(self.timeout)
                if self.source is not None:
                    sock.bind(self.source)
                sock.connect(addr)
                if ep.is_stream:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
                if isinstance(exc, TimeoutError):
                    raise
        assert last is not None
        raise last

    def _bind_unixgram(self, sock: socket.socket) -> None:
        # A datagram client needs an address of its own for the reply to come back to.
        try:
            sock.bind("")  # Linux autobind: a unique abstract address, nothing to clean up
        except OSError:
            path = f"/tmp/sockserve-client-{os.getpid()}-{id(self)}.sock"
            sock.bind(path)
            self._unlink = path

    def _wrap_tls(self, sock: socket.socket, deadline: float | None) -> socket.socket:
        import ssl

        try:
            ctx = self.ssl_context()
            self._left(sock, deadline)  # the handshake gets what the TCP connect left
            return ctx.wrap_socket(sock, server_hostname=self.server_hostname)
        except ssl.SSLError as exc:
            sock.close()
            raise common.tls_failed(self.name, exc) from None
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._unlink:
            try:  # noqa: SIM105 - contextlib would cost the one-shot call 3 ms to import
                os.unlink(self._unlink)
            except OSError:
                pass
            self._unlink = None

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ----------------------------------------------------------------------

    def request(self, data: bytes, sink: Callable[[bytes], object] | None = None) -> bytes:
        """Send one request and return its whole reply (without framing bytes).

        ``sink``: raw framing without ``reply_size`` only, where the reply runs to the
        server's close: each chunk goes to ``sink`` as it arrives (no ``max_message``
        cap, nothing held) and b"" is returned. Elsewhere it is ignored.
        """
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        sock = self.connect()._sock
        assert sock is not None
        if not self.endpoint.is_stream:
            return self._datagram_request(sock, data, deadline)
        if self.raw_to_close:
            return self._raw_request(sock, data, deadline, sink)
        try:
            return self._stream_request(sock, data, deadline)
        except BaseException:
            # The reply's rest may still come: on this connection it would pass for the next.
            self.close()
            self._reset_codec()
            raise

    def send(self, data: bytes) -> None:
        """Send one request without waiting for a reply (for services that never reply)."""
        sock = self.connect()._sock
        assert sock is not None
        try:
            if self.endpoint.is_stream:
                sock.sendall(self._codec.encode(data))
            else:
                sock.send(data)
        except TimeoutError:
            raise common.timed_out(self.name, self.timeout, "request not sent") from None
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise common.request_too_large(self.endpoint, len(data), sock) from None
            raise common.connection_lost(self.name, exc) from None

    def _left(self, sock: socket.socket, deadline: float | None) -> None:
        """Give the next socket call only what is left of the request's deadline."""
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)

    def _raw_request(
        self,
        sock: socket.socket,
        data: bytes,
        deadline: float | None,
        sink: Callable[[bytes], object] | None,
    ) -> bytes:
        """Raw framing, one request per connection: send, half-close, read to the close."""
        cap = self.max_message
        chunks: list[bytes] = []
        size = 0
        try:
            self._left(sock, deadline)
            try:
                sock.sendall(data)
                # The socket method itself: SSLSocket.shutdown would drop the TLS layer first.
                socket.socket.shutdown(sock, socket.SHUT_WR)
            except OSError as exc:
                # A server that replies and closes at once (time, daytime): read its reply.
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise
            while True:
                self._left(sock, deadline)
                chunk = sock.recv(RAW_READ)
                if not chunk:
                    break
                size += len(chunk)
                if sink is not None:
                    sink(chunk)
                    continue
                if size > cap:
                    raise common.raw_reply_too_large(self.name, cap)
                chunks.append(chunk)
        except TimeoutError:
            raise common.timed_out(
                self.name, self.timeout, common.incomplete(size), raw=True
            ) from None
        except OSError as exc:
            raise common.connection_lost(self.name, exc) from None
        finally:
            self.close()  # half-closed: the next request opens a connection of its own
        if not size:
            raise common.closed_before_reply(self.name)
        return b"".join(chunks)

    def _stream_request(self, sock: socket.socket, data: bytes, deadline: float | None) -> bytes:
        codec = self._codec
        try:
            self._left(sock, deadline)
            if self.framing == "raw":
                return self._sized_request(sock, data, deadline)
            sock.sendall(codec.encode(data))
            reply = codec.next_message()
            while reply is None:
                self._left(sock, deadline)
                reply = common.feed_reply(codec, sock.recv(RAW_READ), self.name)
            return reply
        except TimeoutError:
            raise common.timed_out(self.name, self.timeout) from None
        except ProtocolError as exc:
            raise common.bad_reply(self.name, exc) from None
        except OSError as exc:
            raise common.connection_lost(self.name, exc) from None

    def _sized_request(self, sock: socket.socket, data: bytes, deadline: float | None) -> bytes:
        """Raw framing with ``reply_size``: the reply is exactly that many bytes.

        Bytes already waiting before the request is sent, or right after the reply, mean
        the replies are longer than ``reply_size``: fail rather than mis-assign them.
        """
        size = self.reply_size
        assert size is not None
        if self._pending(sock):
            raise common.sized_reply_too_large(self.name, size, before=True)
        sock.sendall(data)
        buf = bytearray()
        while len(buf) < size:
            self._left(sock, deadline)
            chunk = sock.recv(size - len(buf))
            if not chunk:
                raise common.closed_after(self.name, len(buf), size)
            buf += chunk
        if self._pending(sock):
            raise common.sized_reply_too_large(self.name, size, before=False)
        return bytes(buf)

    def _pending(self, sock: socket.socket) -> bool:
        """Whether bytes are already waiting (a socket with a timeout would wait for some)."""
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            return bool(sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False  # nothing waiting (EAGAIN), or an error the next recv reports
        finally:
            sock.settimeout(timeout)

    def _datagram_request(self, sock: socket.socket, data: bytes, deadline: float | None) -> bytes:
        wait = UDP_FIRST_RETRY
        cap = self.max_message
        try:
            while self._pending(sock):  # late replies to a timed-out or retransmitted request
                sock.recv(cap + 1)
            while True:
                sock.send(data)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                sock.settimeout(wait if left is None else min(wait, left))
                try:
                    # One byte over the cap, so a longer datagram is seen, not cut silently.
                    reply = sock.recv(max(cap + 1, 1))
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                    wait *= 2  # lost request or reply: send it again
                    continue
                if len(reply) > cap:
                    raise common.datagram_reply_too_large(self.name, cap)
                return reply
        except TimeoutError:
            raise common.timed_out(self.name, self.timeout) from None
        except OSError as exc:
            raise common.datagram_failed(self.endpoint, exc, len(data), sock) from None
        finally:
            sock.settimeout(self.timeout)

    def recv_stream(self, bufsize: int = RAW_READ) -> bytes:
        """Read whatever the server sends next (b"" at end) for streaming services."""
        sock = self.connect()._sock
        assert sock is not None
        try:
            return sock.recv(bufsize)
        except TimeoutError:
            raise common.timed_out(self.name, self.timeout, "nothing received") from None
        except OSError as exc:
            raise common.connection_lost(self.name, exc) from None


def connect(url: str | Endpoint, **options: Any) -> Client:
    """Open a blocking client to ``url``; use it as a context manager."""
    return Client(url, **options).connect()
