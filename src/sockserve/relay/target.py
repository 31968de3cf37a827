"""TARGET: where a relay joins each connection (or datagram flow) it accepts.

Forms: any endpoint URL (``tcp://HOST:PORT``, ``tcp://[::1]:PORT``, ``unix:///path``,
``tls://HOST:PORT``, ``udp://...``, ``unixgram://...``), a bare ``HOST:PORT`` (TCP, as
socat and HAProxy read it), or ``exec:COMMAND`` (one process per connection; the command
is split as a shell would split it, but no shell runs unless the command is ``sh -c ...``).

Error handling: a TARGET that cannot be parsed raises :class:`EndpointError` naming it
and the form expected; one that cannot be opened raises ``OSError`` (or
``TimeoutError`` past the connect timeout) for the session to log and close on.
"""

from __future__ import annotations

import asyncio
import shlex
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from ..endpoints import Endpoint, parse_endpoint
from ..errors import ConfigError, EndpointError

#: What every TARGET error message lists.
FORMS = "tcp://HOST:PORT, HOST:PORT, unix:///PATH, tls://HOST:PORT, udp://..., or exec:COMMAND"


@dataclass(frozen=True)
class Target:
    """A parsed TARGET: an endpoint to connect to, or a command to run per connection."""

    endpoint: Endpoint | None = None
    command: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """``exec`` or the endpoint's scheme."""
        return "exec" if self.endpoint is None else self.endpoint.scheme

    @property
    def is_stream(self) -> bool:
        return self.endpoint is None or self.endpoint.is_stream

    def __str__(self) -> str:
        if self.endpoint is None:
            return "exec:" + shlex.join(self.command)
        return self.endpoint.url()


def parse_target(text: str | Endpoint | Target) -> Target:
    """Parse TARGET; :class:`EndpointError` (one line, naming it) if it is not one."""
    if isinstance(text, Target):
        return text
    if isinstance(text, Endpoint):
        return _checked(Target(text), str(text))
    if not isinstance(text, str) or not text.strip():
        raise EndpointError(f"empty TARGET; expected {FORMS}")
    if text.startswith("exec:"):
        try:
            argv = tuple(shlex.split(text[5:]))
        except ValueError as exc:  # an unclosed quote
            raise EndpointError(f"TARGET {text!r}: {exc}") from None
        if not argv:
            raise EndpointError(f"TARGET {text!r}: no command after exec:")
        return Target(command=argv)
    url = text if "://" in text else f"tcp://{text}"
    try:
        ep = parse_endpoint(url)
    except EndpointError as exc:
        raise EndpointError(f"TARGET {text!r}: {exc}; expected {FORMS}") from None
    return _checked(Target(ep), text)


def _checked(target: Target, text: str) -> Target:
    ep = target.endpoint
    assert ep is not None
    if ep.is_inet and (ep.port == 0 or ep.is_dualstack):
        raise EndpointError(
            f"TARGET {text!r}: a target needs a real host and port to connect to (not * or port 0)"
        )
    return target


@dataclass(frozen=True)
class Origin:
    """How a relay connects to its TARGET: TLS origination settings and the timeout."""

    connect_timeout: float = 5.0
    tls_ca: str | None = None
    server_name: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    #: Skip certificate verification (tests against self-signed servers without a CA file).
    tls_insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext:
        """The client context for tls:// targets; ConfigError naming a file that won't load."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.tls_insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            if self.tls_ca:
                ctx.load_verify_locations(self.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load --tls-ca {self.tls_ca!r}: {exc}") from None
        if self.tls_client_cert:
            try:
                ctx.load_cert_chain(self.tls_client_cert, self.tls_client_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load client certificate {self.tls_client_cert!r}: {exc}"
                ) from None
        return ctx


async def connect(
    target: Target,
    factory: Callable[[], asyncio.Protocol],
    origin: Origin,
    ssl_context: ssl.SSLContext | None,
) -> tuple[asyncio.Transport, asyncio.Protocol]:
    """Open a stream connection to an endpoint TARGET within the connect timeout."""
    loop = asyncio.get_running_loop()
    ep = target.endpoint
    assert ep is not None and ep.is_stream
    if ep.is_unix:
        path = ep.address()
        coro = loop.create_unix_connection(factory, path)  # type: ignore[arg-type]
    elif ep.scheme == "tls":
        coro = loop.create_connection(
            factory,
            ep.host,
            ep.port,
            ssl=ssl_context,
            server_hostname=origin.server_name or ep.host,
            ssl_handshake_timeout=origin.connect_timeout,
        )
    else:
        coro = loop.create_connection(factory, ep.host, ep.port)
    transport, protocol = await asyncio.wait_for(coro, origin.connect_timeout)
    return transport, protocol
