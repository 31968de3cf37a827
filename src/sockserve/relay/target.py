"""TARGET: where a relay joins each connection (or datagram flow) it accepts, and how
each stream connection reaches it: :func:`connect` (TCP, Unix, TLS), :func:`spawn`
(``exec:``, below), the :class:`FarSide` protocol on that transport, and the :class:`Link`
every session of one relay shares.

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
import contextlib
import logging
import os
import shlex
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._engine.stream import set_linger_zero
from ..config import ServerConfig
from ..endpoints import Endpoint, parse_endpoint
from ..errors import ConfigError, EndpointError
from ..logs import fmt_peer
from .toxics import ToxicSet

relay_log = logging.getLogger("sockserve.relay")

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
    toxics: ToxicSet | None = None  # the relay's live toxics (None: never any)
    ssl_context: ssl.SSLContext | None = None  # for tls:// targets


class FarOwner(Protocol):
    """What a :class:`FarSide` reports to: its session (``session.RelaySession``)."""

    @property
    def link(self) -> Link: ...

    def from_target(self, data: bytes) -> None: ...
    def target_eof(self) -> bool: ...
    def conn_pause(self) -> None: ...
    def conn_resume(self) -> None: ...
    def target_lost(self, exc: Exception | None) -> None: ...


class FarSide(asyncio.Protocol):
    """The target's side of one relayed connection; it reports everything to the session."""

    def __init__(self, session: FarOwner) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.gone = False
        self.full = False  # our write buffer is above its high-water mark

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
        self.full = True
        self.session.conn_pause()

    def resume_writing(self) -> None:
        self.full = False
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


# -- exec: targets ------------------------------------------------------------
# ``exec:COMMAND`` targets: one process per connection, as inetd's ``nowait``, ``ncat
# --exec`` and socat's ``EXEC:`` run one.
#
# The process's stdin and stdout are one end of a socket pair (inetd gives its programs
# the socket itself the same way), so the relay joins the other end exactly as it joins a
# TCP target: half-close works (our ``shutdown(SHUT_WR)`` is EOF on the program's stdin;
# its exit is EOF to us), and so does backpressure. Its stderr goes to the log, a line at a
# time, naming the program and the peer. The environment carries the peer's address under
# the names socat (``SOCAT_PEERADDR``, ``SOCAT_PEERPORT``) and CGI/inetd tools
# (``REMOTE_ADDR``, ``REMOTE_PORT``, ``REMOTE_HOST``) use.
#
# Resource handling: the process is killed (SIGKILL, then reaped) when the connection
# ends, so a program that ignores EOF cannot outlive its client. Error handling: a program
# that cannot start raises ``OSError`` naming it, which closes only that connection.

#: Longest stderr line logged whole; longer ones are cut (a program spewing binary).
MAX_STDERR_LINE = 4096


def peer_environment(peer: Any) -> dict[str, str]:
    """The peer-address variables for a connection from ``peer`` (inet tuple or Unix path)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        addr, port = str(peer[0]), str(peer[1])
    else:
        addr, port = str(peer or ""), ""
    env = {"SOCAT_PEERADDR": addr, "REMOTE_ADDR": addr, "REMOTE_HOST": addr}
    if port:
        env.update(SOCAT_PEERPORT=port, REMOTE_PORT=port)
    return env


class ExecChild:
    """The process behind one connection and the stderr reader that logs it."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, peer: Any) -> None:
        self.proc = proc
        self.name = name
        self.peer = peer
        self._stderr = asyncio.ensure_future(self._log_stderr())

    async def _log_stderr(self) -> None:
        stream = self.proc.stderr
        if stream is None:
            return
        while True:
            try:
                line = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):  # over the reader's limit
                line = await stream.read(MAX_STDERR_LINE)
            if not line:
                return
            relay_log.warning(
                "exec %s (for %s) stderr: %s",
                self.name,
                fmt_peer(self.peer),
                line[:MAX_STDERR_LINE].decode(errors="replace").rstrip("\n"),
                extra={"event": "exec_stderr"},
            )

    def close(self) -> None:
        """Kill the process if it still runs, and reap it in the background."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        reap = asyncio.ensure_future(self.proc.wait())
        reap.add_done_callback(lambda _: self._stderr.cancel())


async def spawn(
    argv: tuple[str, ...], peer: Any, factory: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.Transport, asyncio.Protocol, ExecChild]:
    """Start ``argv`` for a connection from ``peer``; its stdio joined to a transport."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = {**os.environ, **peer_environment(peer)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # a Ctrl-C to the relay is not the program's
            )
        except OSError as exc:
            raise OSError(exc.errno, f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        child = ExecChild(proc, argv[0], peer)
        try:
            transport, protocol = await loop.create_unix_connection(factory, sock=ours)
        except BaseException:
            child.close()
            raise
    except BaseException:
        ours.close()
        raise
    return transport, protocol, child
