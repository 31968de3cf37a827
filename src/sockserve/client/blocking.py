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

Error handling: OS errors are translated at this edge into ConnectError (could
not reach), RequestTimeout (no reply in time), ConnectionClosed (the server
hung up early), ReplyTooLarge / RequestTooLarge (sizes), each naming the
endpoint; a missing TLS file raises TLSFileError naming the file.
"""

from __future__ import annotations

import errno
import os
import time

from ..endpoints import Endpoint, parse_endpoint
from ..errors import (
    ConnectError,
    ConnectionClosed,
    ProtocolError,
    ReplyTooLarge,
    RequestTimeout,
    RequestTooLarge,
    TLSFileError,
)
from ..framing import DEFAULT_MAX_MESSAGE, make_codec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without the 6 ms import of typing
if TYPE_CHECKING:
    import socket
    import ssl
    from collections.abc import Callable
    from typing import Any

    from ..framing import Codec
else:
    # The socket module's C core. The Python layer on top adds enum and selectors, 6 ms of
    # imports, which would more than double a one-shot call's start-up; the client uses
    # nothing from it (ssl, for tls:// only, brings it in when needed).
    import _socket as socket

    from ..framing import Codec

DEFAULT_TIMEOUT = 5.0
#: First UDP retransmission after this long, doubling, until the timeout is spent.
UDP_FIRST_RETRY = 0.5
#: Read size: like the textbook client's recv(1024), but big enough for any datagram.
RAW_READ = 65536
#: The largest UDP payload: 65535 minus the IP and UDP headers (IPv6 without jumbograms: 65527).
UDP_MAX_PAYLOAD = {False: 65507, True: 65527}
#: What to say when raw replies cannot be delimited.
RAW_HINT = "raw replies have no boundaries: use --framing line/length or --reply-size"


class Client:
    """A connection to one endpoint. Not thread-safe; one request at a time."""

    def __init__(
        self,
        url: str | Endpoint,
        *,
        framing: str = "raw",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message: int = DEFAULT_MAX_MESSAGE,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_verify: bool = True,
        server_hostname: str | None = None,
        source: tuple[str, int] | None = None,
        reply_size: int | None = None,
    ) -> None:
        self.endpoint = url if isinstance(url, Endpoint) else parse_endpoint(url)
        self.framing = framing
        self.timeout = timeout
        self.max_message = max_message
        if reply_size is not None and reply_size < 1:
            raise ValueError("reply_size must be at least 1")
        #: Raw framing: every reply is this many bytes (None: a reply ends at the server's close).
        self.reply_size = reply_size
        self._codec: Codec = make_codec(framing, max_message)
        check_tls_files(tls_ca, tls_cert, tls_key)
        self._tls = (tls_ca, tls_cert, tls_key, tls_verify, server_hostname)
        self._source = source
        self._sock: socket.socket | None = None
        self._unlink: str | None = None

    # -- connection --------------------------------------------------------------------

    def connect(self) -> Client:
        if self._sock is not None:
            return self
        ep = self.endpoint
        name = ep.url()
        try:
            if ep.is_unix:
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
            else:
                sock = self._connect_inet(ep)
            if ep.scheme == "tls":
                sock = self._wrap_tls(sock)
        except TimeoutError:
            raise RequestTimeout(name, f"connect timed out after {self.timeout:g}s") from None
        except OSError as exc:
            raise ConnectError(name, _reason(exc)) from None
        self._sock = sock
        return self

    def _connect_inet(self, ep: Endpoint) -> socket.socket:
        socktype = socket.SOCK_STREAM if ep.is_stream else socket.SOCK_DGRAM
        # An ASCII host goes as bytes: a str would load the idna codec (3 ms) for nothing.
        host: str | bytes = ep.host.encode() if ep.host.isascii() else ep.host
        try:
            infos = socket.getaddrinfo(host, ep.port, socket.AF_UNSPEC, socktype)
        except socket.gaierror as exc:
            raise ConnectError(ep.url(), f"cannot resolve {ep.host!r}: {exc.strerror}") from None
        last: OSError | None = None
        for family, stype, proto, _, addr in infos:
            sock = socket.socket(family, stype, proto)
            try:
                sock.settimeout(self.timeout)
                if self._source is not None:
                    sock.bind(self._source)
                sock.connect(addr)
                if ep.is_stream:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
                if isinstance(exc, socket.timeout):
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

    def _wrap_tls(self, sock: socket.socket) -> socket.socket:
        import ssl

        ca, cert, key, verify, hostname = self._tls
        try:
            ctx = ssl_context(ca, cert, key)
        except BaseException:
            sock.close()
            raise
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            return ctx.wrap_socket(sock, server_hostname=hostname or self.endpoint.host)
        except ssl.SSLError as exc:
            sock.close()
            raise ConnectError(
                self.endpoint.url(), f"TLS handshake failed: {exc.reason or exc}"
            ) from None
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
        if self.framing == "raw" and self.reply_size is None:
            return self._raw_request(sock, data, deadline, sink)
        return self._stream_request(sock, data, deadline)

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
            raise RequestTimeout(self.endpoint.url(), "timed out sending") from None
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise self._too_large(sock, len(data)) from None
            raise ConnectionClosed(self.endpoint.url(), _reason(exc)) from None

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
        name = self.endpoint.url()
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
                    raise ReplyTooLarge(
                        name,
                        f"reply longer than the {cap}-byte limit (raw framing reads to the "
                        "server's close): raise --max-message, or use --framing line/length",
                    )
                chunks.append(chunk)
        except TimeoutError:
            what = "no reply" if not size else f"reply not complete ({size} bytes)"
            raise RequestTimeout(
                name,
                f"{what} within {self.timeout:g}s: raw framing waits for the server to "
                "close the connection; use --framing line/length or --reply-size",
            ) from None
        except OSError as exc:
            raise ConnectionClosed(name, _reason(exc)) from None
        finally:
            self.close()  # half-closed: the next request opens a connection of its own
        if not size:
            raise ConnectionClosed(name, "server closed the connection before replying")
        return b"".join(chunks)

    def _stream_request(self, sock: socket.socket, data: bytes, deadline: float | None) -> bytes:
        name = self.endpoint.url()
        codec = self._codec
        try:
            self._left(sock, deadline)
            if self.framing == "raw":
                return self._sized_request(sock, data, deadline)
            sock.sendall(codec.encode(data))
            while True:
                msg = codec.next_message()
                if msg is not None:
                    return msg
                self._left(sock, deadline)
                chunk = sock.recv(RAW_READ)
                if not chunk:
                    last = codec.end_of_input()
                    if last is not None:
                        return last
                    raise ConnectionClosed(name, "server closed the connection before replying")
                codec.feed(chunk)
        except TimeoutError:
            raise RequestTimeout(name, f"no reply within {self.timeout:g}s") from None
        except ProtocolError as exc:
            raise ConnectionClosed(name, f"bad reply: {exc}") from None
        except OSError as exc:
            raise ConnectionClosed(name, _reason(exc)) from None

    def _sized_request(self, sock: socket.socket, data: bytes, deadline: float | None) -> bytes:
        """Raw framing with ``reply_size``: the reply is exactly that many bytes.

        Bytes already waiting before the request is sent, or right after the reply, mean
        the replies are longer than ``reply_size``: fail rather than mis-assign them.
        """
        name = self.endpoint.url()
        size = self.reply_size
        assert size is not None
        if self._pending(sock):
            raise ReplyTooLarge(name, f"the server sent more than --reply-size {size} bytes")
        sock.sendall(data)
        buf = bytearray()
        while len(buf) < size:
            self._left(sock, deadline)
            chunk = sock.recv(size - len(buf))
            if not chunk:
                raise ConnectionClosed(
                    name, f"server closed the connection after {len(buf)} of {size} bytes"
                )
            buf += chunk
        if self._pending(sock):
            raise ReplyTooLarge(name, f"reply longer than --reply-size {size} bytes")
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
        name = self.endpoint.url()
        wait = UDP_FIRST_RETRY
        cap = self.max_message
        try:
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
                    raise ReplyTooLarge(
                        name, f"reply datagram longer than the {cap}-byte limit (--max-message)"
                    )
                return reply
        except TimeoutError:
            raise RequestTimeout(name, f"no reply within {self.timeout:g}s") from None
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise self._too_large(sock, len(data)) from None
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise ConnectError(name, _reason(exc)) from None
            raise ConnectionClosed(name, _reason(exc)) from None
        finally:
            sock.settimeout(self.timeout)

    def _too_large(self, sock: socket.socket, n: int) -> RequestTooLarge:
        ep = self.endpoint
        if ep.is_inet:
            limit = f"UDP carries at most {UDP_MAX_PAYLOAD[ep.is_ipv6]} bytes"
        else:
            buf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            limit = f"the socket's send buffer (SO_SNDBUF) is {buf} bytes"
        return RequestTooLarge(
            ep.url(), f"a {n}-byte request does not fit in one datagram: {limit}"
        )

    def recv_stream(self, bufsize: int = RAW_READ) -> bytes:
        """Read whatever the server sends next (b"" at end) for streaming services."""
        sock = self.connect()._sock
        assert sock is not None
        try:
            return sock.recv(bufsize)
        except TimeoutError:
            raise RequestTimeout(
                self.endpoint.url(), f"nothing received within {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise ConnectionClosed(self.endpoint.url(), _reason(exc)) from None


def check_tls_files(ca: str | None, cert: str | None, key: str | None) -> None:
    """Raise TLSFileError naming a TLS file that is missing or unreadable, before connecting."""
    for option, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TLSFileError(option, path, exc.strerror or str(exc)) from None


def ssl_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A client TLS context; a file it cannot load raises TLSFileError naming the file."""
    import ssl

    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSFileError("--tls-ca", str(ca), _tls_reason(exc)) from None
    if cert:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            names = f"{cert} / {key}" if key else cert
            raise TLSFileError("--tls-cert/--tls-key", names, _tls_reason(exc)) from None
    return ctx


def _tls_reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return getattr(exc, "reason", None) or str(exc)


def connect(url: str | Endpoint, **options: Any) -> Client:
    """Open a blocking client to ``url``; use it as a context manager."""
    return Client(url, **options).connect()


def _reason(exc: OSError) -> str:
    reasons = {
        errno.ECONNREFUSED: "connection refused (is the server running?)",
        errno.ENOENT: "no such socket file",
        errno.ECONNRESET: "connection reset by the server",
        errno.EPIPE: "server closed the connection",
        errno.EHOSTUNREACH: "host unreachable",
        errno.ENETUNREACH: "network unreachable",
        errno.EACCES: "permission denied",
        errno.ECONNABORTED: "connection aborted",
    }
    return reasons.get(exc.errno or 0, exc.strerror or str(exc) or type(exc).__name__)
