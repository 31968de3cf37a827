"""Server settings: one frozen dataclass that the CLI, the API and config files fill in.

Its fields, defaults, kinds and scopes are declared once, in :mod:`sockserve.settings`;
this module holds the values and checks them (types and ranges), so a ``ServerConfig``
that exists is valid.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from dataclasses import dataclass, replace
from typing import Any

from .errors import ConfigError
from .framing import codec_factory
from .settings import (
    BY_NAME,
    DEFAULT_BACKLOG,
    DEFAULT_UDP_RATE,
    DEFAULT_WRITE_HIGH,
    DEFAULT_WRITE_LOW,
    SETTINGS,
    Network,
    default,
    parse_mode,
    parse_network,
    parse_size,
)

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_UDP_RATE",
    "DEFAULT_WRITE_HIGH",
    "DEFAULT_WRITE_LOW",
    "Network",
    "ServerConfig",
    "parse_mode",
    "parse_network",
    "parse_size",
]


def _declared(name: str) -> Any:
    """The dataclass field of setting ``name``: its default is the declared one."""
    if isinstance(BY_NAME[name].default, dict):
        return dataclasses.field(default_factory=lambda: default(name))
    return dataclasses.field(default=default(name))


@dataclass(frozen=True)
class ServerConfig:
    """Serving options of one service's endpoints; the server-wide ones are read from
    ``Server.config`` (their scope in :mod:`sockserve.settings` says which)."""

    framing: str = _declared("framing")
    max_message: int = _declared("max_message")
    idle_timeout: float | None = _declared("idle_timeout")
    #: Server-wide (see Server.config): the process's one connection limit.
    max_conns: int | None = _declared("max_conns")
    backlog: int = _declared("backlog")
    #: Server-wide: how long SIGTERM/SIGINT waits for in-flight requests.
    drain_timeout: float = _declared("drain_timeout")
    write_high_water: int = _declared("write_high_water")
    write_low_water: int = _declared("write_low_water")
    allow: tuple[Network, ...] = _declared("allow")
    deny: tuple[Network, ...] = _declared("deny")
    unix_mode: int | None = _declared("unix_mode")
    tls_cert: str | None = _declared("tls_cert")
    tls_key: str | None = _declared("tls_key")
    tls_client_ca: str | None = _declared("tls_client_ca")
    tls_handshake_timeout: float = _declared("tls_handshake_timeout")
    #: TLS handshakes in progress per listener; past it the oldest is dropped (0 = no cap).
    max_handshakes: int = _declared("max_handshakes")
    #: Datagrams from source ports below this are dropped (reflection guard); port 0 always is.
    udp_min_source_port: int = _declared("udp_min_source_port")
    #: Replies/s per UDP source; None = DEFAULT_UDP_RATE on non-loopback binds, off on loopback.
    udp_rate: float | None = _declared("udp_rate")
    #: Allow UDP replies larger than the request to non-loopback sources (amplifiers).
    udp_amplify: bool = _declared("udp_amplify")
    reuse_port: bool = _declared("reuse_port")
    #: "auto": plain TCP/Unix request/reply and datagram sockets run on the epoll engine
    #: (Linux), the rest on asyncio transports; "asyncio": everything on transports.
    engine: str = _declared("engine")
    #: Server-wide: after a batch of requests, keep polling this many microseconds before
    #: sleeping (0 = off).
    busy_poll_us: int = _declared("busy_poll_us")
    #: Server-wide: threads that run blocking ``def`` handlers (started as needed).
    handler_threads: int = _declared("handler_threads")
    #: Run the ``def`` handler in the handler threads from the first request...
    blocking: bool = _declared("blocking")
    #: ...or always inline, however slow; neither: inline until seen to block the loop.
    nonblocking: bool = _declared("nonblocking")
    proxy_protocol: bool = _declared("proxy_protocol")
    proxy_from: tuple[Network, ...] = _declared("proxy_from")
    proxy_header_timeout: float = _declared("proxy_header_timeout")
    service_options: dict[str, Any] = _declared("service_options")  # noqa: RUF009 (a factory)
    #: Log every request and reply as a hex dump (``serve --trace``), on logger sockserve.trace.
    trace: bool = _declared("trace")

    def __post_init__(self) -> None:
        # The Python API takes what the CLI takes: CIDR strings, an octal mode string, a
        # size such as "64K". Converted here, once, so no connection meets a str later.
        for name in ("allow", "deny", "proxy_from"):
            object.__setattr__(self, name, _networks(name, getattr(self, name)))
        if isinstance(self.unix_mode, str):
            object.__setattr__(self, "unix_mode", _field(parse_mode, "unix_mode", self.unix_mode))
        if isinstance(self.max_message, str):
            object.__setattr__(
                self, "max_message", _field(parse_size, "max_message", self.max_message)
            )
        _check_types(self)
        # Raises ConfigError for an unknown name, and imports the codec now: not at the
        # first request, when descriptors may be exhausted (EMFILE) and an import would fail.
        codec_factory(self.framing)
        if self.max_message < 1:
            raise ConfigError(f"max message must be at least 1 byte, got {self.max_message}")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ConfigError(f"idle timeout must be positive, got {self.idle_timeout}")
        if self.max_conns is not None and self.max_conns < 1:
            raise ConfigError(f"max conns must be at least 1, got {self.max_conns}")
        if self.max_handshakes < 0:
            raise ConfigError(
                f"max handshakes must be >= 0 (0 = no cap), got {self.max_handshakes}"
            )
        if self.backlog < 1:
            raise ConfigError(f"backlog must be at least 1, got {self.backlog}")
        if self.drain_timeout < 0:
            raise ConfigError(f"drain timeout must be >= 0, got {self.drain_timeout}")
        if not 0 < self.write_low_water <= self.write_high_water:
            raise ConfigError("write low-water mark must be positive and <= the high-water mark")
        if self.engine not in ("auto", "asyncio"):
            raise ConfigError(f"unknown engine {self.engine!r}; expected auto or asyncio")
        if not 0 <= self.busy_poll_us <= 10_000:
            raise ConfigError(
                f"busy poll must be within 0-10000 microseconds, got {self.busy_poll_us}"
            )
        if not 1 <= self.handler_threads <= 1024:
            raise ConfigError(f"handler threads must be within 1-1024, got {self.handler_threads}")
        if self.blocking and self.nonblocking:
            raise ConfigError("--blocking and --nonblocking both given; choose one")
        if self.udp_rate is not None and self.udp_rate < 0:
            raise ConfigError(f"UDP rate must be >= 0 (0 = off), got {self.udp_rate}")
        if not 0 <= self.udp_min_source_port <= 65535:
            raise ConfigError("UDP minimum source port must be within 0-65535")
        # NaN or inf would leave a client that stalls inside its PROXY header held for good.
        if not 0 < self.proxy_header_timeout < math.inf:
            raise ConfigError(
                f"PROXY header timeout must be a positive number of seconds, "
                f"got {self.proxy_header_timeout}"
            )
        if self.tls_key is not None and self.tls_cert is None:
            raise ConfigError("--tls-key given without --tls-cert")

    def replace(self, **changes: Any) -> ServerConfig:
        return replace(self, **changes)


#: Fields that must hold numbers (ints or floats; bool is refused: True is not a size).
_NUMBER_FIELDS = tuple(x.name for x in SETTINGS if x.kind.holds != "other")
_INT_FIELDS = frozenset(x.name for x in SETTINGS if x.kind.holds == "int")
_NULLABLE = frozenset(x.name for x in SETTINGS if x.nullable)

if tuple(f.name for f in dataclasses.fields(ServerConfig)) != tuple(x.name for x in SETTINGS):
    raise AssertionError("ServerConfig's fields must be the settings declared, in their order")


def _field(parse: Any, name: str, value: str) -> Any:
    """``parse(value)``, with the field's name in the error: ``ServerConfig(...)`` has many."""
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(f"ServerConfig {name}: {exc}") from None


def _networks(name: str, value: Any) -> tuple[Network, ...]:
    """A tuple of networks from networks, CIDR strings, or one CIDR string."""
    if isinstance(value, (str, ipaddress.IPv4Network, ipaddress.IPv6Network)):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ConfigError(
            f"ServerConfig {name}: expected a list of CIDR strings, got {type(value).__name__}"
        ) from None
    out: list[Network] = []
    for item in items:
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            out.append(item)
        elif isinstance(item, str):
            out.append(_field(parse_network, name, item))
        else:
            raise ConfigError(
                f"ServerConfig {name}: expected CIDR strings such as '10.0.0.0/8', "
                f"got {type(item).__name__} {item!r}"
            )
    return tuple(out)


def _check_types(cfg: ServerConfig) -> None:
    """Refuse a wrong type now, naming the field, rather than a TypeError per connection."""
    for name in _NUMBER_FIELDS:
        value = getattr(cfg, name)
        if value is None and name in _NULLABLE:
            continue
        ok = isinstance(value, int) if name in _INT_FIELDS else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            kind = "an integer" if name in _INT_FIELDS else "a number"
            raise ConfigError(f"ServerConfig {name}: expected {kind}, got {value!r}")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        value = getattr(cfg, name)
        if isinstance(value, os.PathLike):  # a pathlib.Path is a file name too
            value = os.fspath(value)
            object.__setattr__(cfg, name, value)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"ServerConfig {name}: expected a file name, got {value!r}")
    if not isinstance(cfg.framing, str):
        raise ConfigError(
            f"ServerConfig framing: expected raw, line or length, got {cfg.framing!r}"
        )


def blame(base: ServerConfig, changes: dict[str, Any]) -> str | None:
    """Which of ``changes`` makes ``base.replace(**changes)`` fail, for an error naming it.

    Each change is tried alone on ``base``; None when none fails alone (two that only
    clash together, such as the write marks).
    """
    for name, value in changes.items():
        try:
            base.replace(**{name: value})
        except ConfigError:
            return name
    return None
