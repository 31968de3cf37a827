"""One hierarchy of errors, so callers catch meaning rather than OS details.

The library raises these; only the CLI turns them into messages and exit codes.
Protocol errors follow h11: *Remote* means the peer broke the framing,
*Local* means we were asked to send something the framing cannot carry.
"""

from __future__ import annotations


class SockserveError(Exception):
    """Base of every error sockserve raises on purpose."""


class EndpointError(SockserveError, ValueError):
    """An endpoint URL could not be parsed or is not usable for this purpose."""


class ServiceError(SockserveError):
    """A service name or ``module:attr`` string could not be resolved to a service."""


class ConfigError(SockserveError, ValueError):
    """A server setting is out of range or contradicts another."""


class ProtocolError(SockserveError):
    """Bytes that do not fit the framing in use."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the framing (or exceed its size cap)."""


class MessageTooLarge(RemoteProtocolError):
    """A message from the peer is longer than the configured cap."""


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the framing cannot carry."""


class ClientError(SockserveError):
    """A client-side failure talking to one endpoint; ``endpoint`` names it.

    ``errno`` is the OS error's that caused it, or None. Its subclasses that are also
    builtin OS errors (``ConnectError``, ``RequestTimeout``) keep ``str(exc)`` as
    ``"ENDPOINT: REASON"``.
    """

    errno: int | None

    def __init__(self, endpoint: str, reason: str, errno: int | None = None) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.errno = errno

    def __reduce__(self) -> tuple[type[ClientError], tuple[str, str, int | None]]:
        # The default rebuilds from ``args`` (the one formatted message): not our signature.
        return type(self), (self.endpoint, self.reason, self.errno)


class ConnectError(ClientError, ConnectionError):
    """Could not reach the endpoint: refused, unreachable, no such socket file, TLS failure,
    or no answer within the timeout (a connect timeout: nothing was sent).

    Also a builtin :class:`ConnectionError`, so ``except ConnectionError`` catches it."""


class RequestTimeout(ClientError, TimeoutError):
    """Connected, but no (complete) reply came within the timeout.

    Also a builtin :class:`TimeoutError`, so ``except TimeoutError`` catches it. A connect
    that times out is a :class:`ConnectError` instead: the server was never reached."""


class ConnectionClosed(ClientError):
    """The server closed the connection before the reply was complete."""


class ReplyTooLarge(ClientError):
    """A reply is longer than the client's ``max_message``, or could not be delimited.

    Raised instead of handing back a cut reply: raising ``max_message`` or choosing a
    framing (or ``reply_size``) that marks where replies end is the fix.
    """


class RequestTooLarge(ClientError):
    """A request cannot be sent at all, e.g. a datagram over the transport's size limit."""


class TLSFileError(ConfigError):
    """A ``tls_ca``/``tls_cert``/``tls_key`` file is missing or unreadable; ``path`` names it."""

    def __init__(self, option: str, path: str, reason: str) -> None:
        super().__init__(f"{option} {path}: {reason}")
        self.option = option
        self.path = path
        self.reason = reason
