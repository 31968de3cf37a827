"""What the blocking and the asyncio client share: settings, TLS contexts, error wording.

Both clients take the same options and must fail the same way, so the option
checks, the TLS context and every error message live here, once. The module
imports only ``errno`` at the top (``ssl`` when a TLS context is built), because
the blocking client is on the path of a one-shot ``sockserve call``.

Error handling: every function named after a failure returns the typed error
(the caller raises it ``from None``), worded as ``ENDPOINT: what failed, and what
to do``. A connect that fails or times out is a :class:`ConnectError` (exit 3 in
the CLI): nothing reached the server. A timeout after connecting is a
:class:`RequestTimeout` (exit 4).
"""

from __future__ import annotations

import errno

from ..endpoints import Endpoint, parse_endpoint
from ..errors import (
    ClientError,
    ConnectError,
    ConnectionClosed,
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

    from ..framing import Codec

DEFAULT_TIMEOUT = 5.0
#: First UDP retransmission after this long, doubling, until the timeout is spent.
UDP_FIRST_RETRY = 0.5
#: Read size: like the textbook client's recv(1024), but big enough for any datagram.
RAW_READ = 65536
#: The largest UDP payload: 65535 minus the IP and UDP headers (IPv6 without jumbograms: 65527).
UDP_MAX_PAYLOAD = {False: 65507, True: 65527}
#: What to say when raw replies cannot be delimited.
RAW_HINT = (
    "raw framing waits for the server to close the connection; use line/length framing "
    "or reply_size (call: --framing line/length or --reply-size)"
)

#: Why an OS call failed, in words that say what to check (others: the OS's own words).
OS_REASONS = {
    errno.ECONNREFUSED: "connection refused (is the server running?)",
    errno.ENOENT: "no such socket file",
    errno.ECONNRESET: "connection reset by the server",
    errno.EPIPE: "server closed the connection",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EACCES: "permission denied",
    errno.ECONNABORTED: "connection aborted",
    errno.ETIMEDOUT: "connection timed out (the system's limit)",
    # connect() on a Unix socket whose accept queue is full fails at once, it does not wait.
    errno.EAGAIN: "the server's accept queue is full (too many connections waiting)",
}


class ClientSettings:
    """The options both clients take, checked once, before any socket is opened.

    Error handling: a bad URL raises EndpointError, an unknown framing or a
    ``reply_size`` below 1 ValueError, a missing TLS file TLSFileError naming it.
    """

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
        #: The endpoint as every error message names it.
        self.name = self.endpoint.url()
        self.framing = framing
        #: Deadline of a whole request (connect, send, every read); None: wait for ever.
        self.timeout = timeout
        self.max_message = max_message
        if reply_size is not None and reply_size < 1:
            raise ValueError("reply_size must be at least 1")
        #: Raw framing: every reply is this many bytes (None: a reply ends at the server's close).
        self.reply_size = reply_size
        self._codec: Codec = make_codec(framing, max_message)
        check_tls_files(tls_ca, tls_cert, tls_key)
        self._tls = (tls_ca, tls_cert, tls_key, tls_verify)
        #: The TLS server name to verify (tls:// only).
        self.server_hostname = server_hostname or self.endpoint.host
        #: Local (host, port) to bind before connecting, on IP endpoints.
        self.source = source

    @property
    def raw_to_close(self) -> bool:
        """Whether a reply runs to the server's close (a connection per request)."""
        return self.endpoint.is_stream and self.framing == "raw" and self.reply_size is None

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context for this endpoint (``tls_verify=False``: no checks)."""
        ca, cert, key, verify = self._tls
        ctx = ssl_context(ca, cert, key)
        if not verify:
            import ssl

            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _reset_codec(self) -> None:
        """Forget half-received replies: after a failed request they belong to no one."""
        self._codec = make_codec(self.framing, self.max_message)


# -- TLS ---------------------------------------------------------------------------------


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


# -- error wording -----------------------------------------------------------------------


def os_reason(exc: OSError) -> str:
    """The words for an OS error: ours for the usual ones, else the OS's own."""
    return OS_REASONS.get(exc.errno or 0) or exc.strerror or str(exc) or type(exc).__name__


def _within(timeout: float | None) -> str:
    # No timeout set, yet timed out: the kernel gave up (ETIMEDOUT), not our deadline.
    return f"within {timeout:g}s" if timeout is not None else "before the system's limit"


def connect_failed(name: str, exc: OSError) -> ConnectError:
    """The server could not be reached (refused, no such file, unreachable, ...)."""
    return ConnectError(name, os_reason(exc), exc.errno)


def connect_timed_out(name: str, timeout: float | None, tls: bool) -> ConnectError:
    """No connection (and, for tls://, no finished handshake) within the timeout."""
    what = "connect and TLS handshake" if tls else "connect"
    return ConnectError(
        name,
        f"{what} not done {_within(timeout)} (is the host up and the port open, "
        "or is a firewall dropping packets?)",
        errno.ETIMEDOUT,
    )


def cannot_resolve(name: str, host: str, exc: OSError) -> ConnectError:
    return ConnectError(name, f"cannot resolve {host!r}: {exc.strerror or exc}")


def tls_failed(name: str, exc: ssl.SSLError) -> ConnectError:
    return ConnectError(name, f"TLS handshake failed: {exc.reason or exc}")


def timed_out(
    name: str, timeout: float | None, what: str = "no reply", raw: bool = False
) -> RequestTimeout:
    """Connected, but ``what`` (no reply, an incomplete one, ...) when the timeout ran out."""
    hint = f": {RAW_HINT}" if raw else ""
    return RequestTimeout(name, f"{what} {_within(timeout)}{hint}", errno.ETIMEDOUT)


def incomplete(received: int) -> str:
    """How much of a reply came, for :func:`timed_out`."""
    return "no reply" if not received else f"reply not complete ({received} bytes)"


def feed_reply(codec: Codec, chunk: bytes, name: str) -> bytes | None:
    """Feed what one read returned (b"": the server closed) to ``codec``: a whole reply, or
    None while more is needed; ConnectionClosed if the server closed before the reply."""
    if chunk:
        codec.feed(chunk)
        return codec.next_message()
    last = codec.end_of_input()
    if last is None:
        raise closed_before_reply(name)
    return last


def closed_before_reply(name: str) -> ConnectionClosed:
    return ConnectionClosed(name, "server closed the connection before replying")


def closed_after(name: str, got: int, size: int) -> ConnectionClosed:
    return ConnectionClosed(name, f"server closed the connection after {got} of {size} bytes")


def connection_lost(name: str, exc: OSError) -> ConnectionClosed:
    return ConnectionClosed(name, os_reason(exc))


def bad_reply(name: str, exc: Exception) -> ConnectionClosed:
    return ConnectionClosed(name, f"bad reply: {exc}")


def raw_reply_too_large(name: str, cap: int) -> ReplyTooLarge:
    return ReplyTooLarge(
        name,
        f"reply longer than the {cap}-byte limit (raw framing reads to the server's close): "
        "raise max_message (call: --max-message), or use line/length framing",
    )


def datagram_reply_too_large(name: str, cap: int) -> ReplyTooLarge:
    return ReplyTooLarge(
        name, f"reply datagram longer than the {cap}-byte limit (max_message, --max-message)"
    )


def sized_reply_too_large(name: str, size: int, before: bool) -> ReplyTooLarge:
    """Raw framing with ``reply_size``: bytes beyond the expected reply (sent before or after)."""
    what = "the server sent more than" if before else "reply longer than"
    return ReplyTooLarge(name, f"{what} reply_size (--reply-size) {size} bytes")


def request_too_large(ep: Endpoint, n: int, sock: socket.socket) -> RequestTooLarge:
    """A datagram the transport refused (EMSGSIZE): say the limit it has."""
    if ep.is_inet:
        limit = f"UDP carries at most {UDP_MAX_PAYLOAD[ep.is_ipv6]} bytes"
    else:
        import _socket

        buf = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF)
        limit = f"the socket's send buffer (SO_SNDBUF) is {buf} bytes"
    return RequestTooLarge(ep.url(), f"a {n}-byte request does not fit in one datagram: {limit}")


def datagram_failed(ep: Endpoint, exc: OSError, n: int, sock: socket.socket) -> ClientError:
    """What a datagram send or receive error means: too large, nobody there, or lost."""
    if exc.errno == errno.EMSGSIZE:
        return request_too_large(ep, n, sock)
    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
        return connect_failed(ep.url(), exc)
    return connection_lost(ep.url(), exc)
