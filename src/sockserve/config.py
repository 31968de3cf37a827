"""Server settings: one frozen dataclass that the CLI, the API and config files fill in.

Defaults are the documented ones; every number carries the reason it is that number.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ConfigError
from .framing import DEFAULT_MAX_MESSAGE, codec_factory

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Kernel accept queue. Big so a burst of thousands of connects is queued rather
#: than dropped into SYN retries (asyncio's default of 100 makes 10k connects take 44 s);
#: Linux clamps it to net.core.somaxconn.
DEFAULT_BACKLOG = 65535
#: Pause reading a client whose unsent replies pass this (it is not reading them).
DEFAULT_WRITE_HIGH = 256 * 1024
DEFAULT_WRITE_LOW = 64 * 1024
#: Replies per second per UDP source when the guard is on (non-loopback binds by default).
DEFAULT_UDP_RATE = 100.0


@dataclass(frozen=True)
class ServerConfig:
    """Per-endpoint serving options (the same for every endpoint of one service)."""

    framing: str = "raw"
    max_message: int = DEFAULT_MAX_MESSAGE
    idle_timeout: float | None = 300.0
    max_conns: int | None = None
    backlog: int = DEFAULT_BACKLOG
    drain_timeout: float = 10.0
    write_high_water: int = DEFAULT_WRITE_HIGH
    write_low_water: int = DEFAULT_WRITE_LOW
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    unix_mode: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    tls_handshake_timeout: float = 10.0
    #: TLS handshakes in progress per listener; past it the oldest is dropped (0 = no cap).
    #: Each costs 50-300 KB until it ends, so silent clients cannot run memory up; 256 at
    #: once finish ~2,500 handshakes/s at 100 ms RTT, more than one core computes.
    max_handshakes: int = 256
    #: Datagrams from source ports below this are dropped (reflection guard); port 0 always is.
    udp_min_source_port: int = 1024
    #: Replies/s per UDP source; None = DEFAULT_UDP_RATE on non-loopback binds, off on loopback.
    udp_rate: float | None = None
    #: Allow UDP replies larger than the request to non-loopback sources (amplifiers).
    udp_amplify: bool = False
    reuse_port: bool = False
    #: "auto": plain TCP/Unix request/reply and datagram sockets run on the epoll engine
    #: (Linux), the rest on asyncio transports; "asyncio": everything on transports.
    engine: str = "auto"
    #: After a batch of requests, keep polling this many microseconds before sleeping: a
    #: client's next request usually lands inside it, saving a sleep and wake-up (0 = off).
    busy_poll_us: int = 50
    proxy_protocol: bool = False
    proxy_from: tuple[Network, ...] = ()
    proxy_header_timeout: float = 5.0
    service_options: dict[str, Any] = field(default_factory=dict)
    #: Log every request and reply as a hex dump (``serve --trace``), on logger sockserve.trace.
    trace: bool = False

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
_NUMBER_FIELDS = (
    "max_message",
    "idle_timeout",
    "max_conns",
    "backlog",
    "drain_timeout",
    "write_high_water",
    "write_low_water",
    "unix_mode",
    "tls_handshake_timeout",
    "udp_min_source_port",
    "udp_rate",
    "busy_poll_us",
    "proxy_header_timeout",
)
_INT_FIELDS = frozenset(
    {"max_message", "max_conns", "backlog", "write_high_water", "write_low_water", "unix_mode"}
    | {"udp_min_source_port", "busy_poll_us"}
)


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
        if value is None and name in ("idle_timeout", "max_conns", "unix_mode", "udp_rate"):
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


def parse_size(text: str) -> int:
    """Bytes with an optional binary K/M/G suffix (``65536``, ``64K``, ``1MiB``); ValueError if not."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = units.get(t[-1:], 1)
    digits = t[:-1] if mult != 1 else t
    if not digits.isdigit():
        raise ValueError(f"expected bytes such as 65536 or 64K, not {text!r}")
    return int(digits) * mult


def parse_network(text: str) -> Network:
    """Parse a CIDR (or a bare address) for --allow/--deny; raise ConfigError naming it."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"bad network {text!r}: {exc}") from None


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f"bad Unix socket mode {text!r}: expected octal such as 660") from None
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f"bad Unix socket mode {text!r}: out of range")
    return mode
