"""The blocking client: the textbook client made correct (framing, timeouts, typed errors).

Uses only the ``socket`` module (``ssl`` only for tls://), so a one-shot
``sockserve call`` starts fast. ``connect(url)`` returns a reusable client::

    with sockserve.connect("tcp://127.0.0.1:21567") as c:
        print(c.request(b"hello"))

Error handling: OS errors are translated at this edge into ConnectError (could
not reach), RequestTimeout (no reply in time) and ConnectionClosed (the server
hung up early), each naming the endpoint.
"""

from __future__ import annotations

import errno
import os
import time

from .endpoints import Endpoint, parse_endpoint
from .errors import ConnectError, ConnectionClosed, ProtocolError, RequestTimeout
from .framing import DEFAULT_MAX_MESSAGE, make_codec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without the 6 ms import of typing
if TYPE_CHECKING:
    import socket
    from typing import Any

    from .framing import Codec
else:
    # The socket module's C core. The Python layer on top adds enum and selectors, 6 ms of
    # imports, which would more than double a one-shot call's start-up; the client uses
    # nothing from it (ssl, for tls:// only, brings it in when needed).
    import _socket as socket

    from .framing import Codec

DEFAULT_TIMEOUT = 5.0
#: First UDP retransmission after this long, doubling, until the timeout is spent.
UDP_FIRST_RETRY = 0.5
#: Read size for raw framing: like the textbook client's recv(1024), but big enough for any reply.
RAW_READ = 65536


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
    ) -> None:
        self.endpoint = url if isinstance(url, Endpoint) else parse_endpoint(url)
        self.framing = framing
        self.timeout = timeout
        self.max_message = max_message
        self._codec: Codec = make_codec(framing, max_message)
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
        ctx = ssl.create_default_context(cafile=ca)
        if cert:
            ctx.load_cert_chain(cert, key)
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

    def request(self, data: bytes) -> bytes:
        """Send one request and return its reply (without framing bytes)."""
        sock = self.connect()._sock
        assert sock is not None
        if self.endpoint.is_stream:
            return self._stream_request(sock, data)
        return self._datagram_request(sock, data)

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
            raise ConnectionClosed(self.endpoint.url(), _reason(exc)) from None

    def _stream_request(self, sock: socket.socket, data: bytes) -> bytes:
        name = self.endpoint.url()
        codec = self._codec
        try:
            sock.sendall(codec.encode(data))
            while True:
                msg = codec.next_message()
                if msg is not None:
                    return msg
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

    def _datagram_request(self, sock: socket.socket, data: bytes) -> bytes:
        name = self.endpoint.url()
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        wait = UDP_FIRST_RETRY
        try:
            while True:
                sock.send(data)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                sock.settimeout(wait if left is None else min(wait, left))
                try:
                    return sock.recv(RAW_READ)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                    wait *= 2  # lost request or reply: send it again
        except TimeoutError:
            raise RequestTimeout(name, f"no reply within {self.timeout:g}s") from None
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise ConnectError(name, _reason(exc)) from None
            raise ConnectionClosed(name, _reason(exc)) from None
        finally:
            sock.settimeout(self.timeout)

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
