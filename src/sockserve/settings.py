"""Every server setting, declared once: the ``serve`` options, the TOML keys and the docs table.

Each :class:`Setting` names one :class:`~sockserve.config.ServerConfig` field and says its
kind (how a command-line word and a TOML value become the field's value), its default,
its help text, whether a SIGHUP reload can change it, and its scope: ``"server"`` for the
values one process has once (the connection limit, the drain timeout, the busy-poll spin),
``"service"`` for those each ``[[service]]`` table may set for its own endpoints. The CLI
option is the name with dashes (``--max-conns``), the TOML key the name itself; older
spellings stay as aliases (``--busy-poll``). ``ServerConfig``'s fields, the ``serve``
parser, the config-file reader and ``docs/configuration.md`` are all built from
:data:`SETTINGS`, so a new setting is one entry here and nothing else can forget it.

Bottom layer: imports only errors and framing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError
from .framing import DEFAULT_MAX_MESSAGE

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Scope = Literal["server", "service"]

#: Kernel accept queue. Big so a burst of thousands of connects is queued rather
#: than dropped into SYN retries (asyncio's default of 100 makes 10k connects take 44 s);
#: Linux clamps it to net.core.somaxconn.
DEFAULT_BACKLOG = 65535
#: Pause reading a client whose unsent replies pass this (it is not reading them).
DEFAULT_WRITE_HIGH = 256 * 1024
DEFAULT_WRITE_LOW = 64 * 1024
#: Replies per second per UDP source when the guard is on (non-loopback binds by default).
DEFAULT_UDP_RATE = 100.0


# -- value parsers shared by the CLI, the TOML reader and ServerConfig ----------------------


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


# -- kinds: how a word on the command line and a TOML value are read ------------------------


def _cli_size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise ValueError(f"bad size: {exc}") from None
    if value < 1:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def _cli_seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"bad number of seconds {text!r}") from None


def _cli_timeout(text: str) -> float | None:
    value = _cli_seconds(text)
    if value < 0:
        raise ValueError(f"seconds must be >= 0: {text!r}")
    return value or None  # 0 = never


def _cli_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _cli_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _cli_options(words: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise ValueError(f"expected KEY=VALUE, got {word!r}")
        options[key] = value
    return options


def _toml_size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return parse_size(value)
    raise ValueError('expected bytes, e.g. 65536 or "64K"')


def _toml_number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError("expected a number")


def _toml_timeout(value: Any) -> float | None:
    return _toml_number(value) or None  # 0 = never, as on the command line


def _toml_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("expected an integer")


def _toml_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("expected true or false")


def _toml_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("expected a string")


def _toml_networks(value: Any) -> tuple[Network, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of CIDR strings")
    return tuple(parse_network(v) for v in value)


def _toml_mode(value: Any) -> int:
    return parse_mode(str(value) if isinstance(value, int) else _toml_str(value))


def _toml_options(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    raise ValueError('expected a table, e.g. options = { quote = "..." }')


@dataclass(frozen=True)
class Kind:
    """One type of setting: how the CLI and a TOML file spell it, and what ServerConfig holds.

    ``cli`` gets the option's word (a list of words when ``repeat``; nothing for a
    ``flag``), ``toml`` the TOML value; both raise ValueError or ConfigError saying what
    was expected, and the caller adds which option or key it was.
    """

    name: str  # for the docs table
    cli: Callable[[Any], Any]
    toml: Callable[[Any], Any]
    holds: Literal["int", "number", "other"] = "other"  # what ServerConfig checks it is
    repeat: bool = False  # the option may be given several times
    flag: bool = False  # an option without a value: given means true


SIZE = Kind("bytes", _cli_size, _toml_size, "int")
INT = Kind("integer", _cli_int, _toml_int, "int")
NUMBER = Kind("number", _cli_number, _toml_number, "number")
SECONDS = Kind("seconds", _cli_seconds, _toml_number, "number")
TIMEOUT = Kind("seconds, 0 = never", _cli_timeout, _toml_timeout, "number")
MODE = Kind("octal mode", parse_mode, _toml_mode, "int")
FLAG = Kind("true/false", bool, _toml_bool, flag=True)
TEXT = Kind("string", str, _toml_str)
FILE = Kind("file name", str, _toml_str)
NETWORKS = Kind("CIDR list", lambda ws: tuple(map(parse_network, ws)), _toml_networks, repeat=True)
OPTIONS = Kind("table", _cli_options, _toml_options, repeat=True)


@dataclass(frozen=True)
class Setting:
    """One ServerConfig field, as every front end sees it."""

    name: str  # the ServerConfig field and TOML key; the CLI option is ``--`` + dashes
    kind: Kind
    default: Any
    help: str  # the ``--help`` text; it says the default as users read it
    group: str  # the ``--help`` section
    scope: Scope = "service"
    #: A SIGHUP reload applies a change (to new connections); False: only a restart does.
    reloadable: bool = True
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # older option spellings, kept working
    nullable: bool = False  # None is a value ("no limit", "never", "auto")
    #: Server scope: how the tables' values become the process's one value.
    combine: Callable[[Iterable[Any]], Any] | None = None
    toml_aliases: tuple[str, ...] = ()

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def options(self) -> tuple[str, ...]:
        return (self.option, *self.aliases)


def _smallest(values: Iterable[Any]) -> Any:
    """The tightest connection limit of the tables is the process's (None = no limit)."""
    limits = [v for v in values if v is not None]
    return min(limits) if limits else None


_LIMITS, _ACCESS, _TLS, _UDP = "limits", "access", "TLS (tls:// endpoints)", "UDP guards"
_PROXY, _RUN = "behind a proxy", "logging and runtime"

# fmt: off
SETTINGS: tuple[Setting, ...] = (
    Setting("framing", TEXT, "raw", "stream framing (default raw: each chunk received is one "
            "request)", "framing", choices=("raw", "line", "length")),
    Setting("max_message", SIZE, DEFAULT_MAX_MESSAGE, "largest request; longer closes the "
            "connection (default 64K)", _LIMITS, metavar="BYTES"),
    Setting("idle_timeout", TIMEOUT, 300.0, "close connections that complete no request for "
            "this long; 0 = never (default 300)", _LIMITS, metavar="SECONDS", nullable=True),
    Setting("max_conns", INT, None, "stop accepting at N open connections, resume when one "
            "closes (default: no limit)", _LIMITS, "server", metavar="N", nullable=True,
            combine=_smallest),
    Setting("backlog", INT, DEFAULT_BACKLOG, "listen backlog (default 65535)", _LIMITS,
            metavar="N"),
    Setting("drain_timeout", SECONDS, 10.0, "on SIGTERM/SIGINT, wait this long for in-flight "
            "requests (default 10)", _LIMITS, "server", metavar="SECONDS", combine=max),
    Setting("write_high_water", SIZE, DEFAULT_WRITE_HIGH, "stop reading a client whose unsent "
            "replies pass this (default 256K)", _LIMITS, metavar="BYTES"),
    Setting("write_low_water", SIZE, DEFAULT_WRITE_LOW, "resume reading it once they are "
            "below this (default 64K)", _LIMITS, metavar="BYTES"),
    Setting("allow", NETWORKS, (), "only these clients (repeatable)", _ACCESS, metavar="CIDR"),
    Setting("deny", NETWORKS, (), "never these clients (repeatable)", _ACCESS, metavar="CIDR"),
    Setting("unix_mode", MODE, None, "permissions of Unix socket files, e.g. 660", _ACCESS,
            metavar="OCTAL", nullable=True),
    Setting("tls_cert", FILE, None, "server certificate (PEM)", _TLS, metavar="FILE"),
    Setting("tls_key", FILE, None, "server private key (PEM)", _TLS, metavar="FILE"),
    Setting("tls_client_ca", FILE, None, "require client certificates signed by this CA", _TLS,
            metavar="FILE"),
    Setting("tls_handshake_timeout", SECONDS, 10.0, "close TLS connections whose handshake "
            "is not done by then (default 10)", _TLS, metavar="SECONDS"),
    # Each handshake costs 50-300 KB until it ends, so silent clients cannot run memory up;
    # 256 at once finish ~2,500 handshakes/s at 100 ms RTT, more than one core computes.
    Setting("max_handshakes", INT, 256, "TLS handshakes in progress per listener; past it the "
            "oldest is dropped (default 256; 0 = no cap)", _LIMITS, metavar="N"),
    Setting("udp_min_source_port", INT, 1024, "drop datagrams from source ports below this "
            "(default 1024; port 0 is always dropped)", _UDP, metavar="PORT"),
    Setting("udp_rate", NUMBER, None, "replies/s per source; 0 = off, the UDP loop budget too "
            "(default: 100 on non-loopback binds, off on loopback)", _UDP, metavar="N",
            nullable=True),
    Setting("udp_amplify", FLAG, False, "let amplifying services reply larger than the request "
            "to non-loopback sources", _UDP),
    Setting("reuse_port", FLAG, False, "bind inet endpoints with SO_REUSEPORT, so other "
            "processes can serve the same port (--workers sets it itself)", "deployment",
            reloadable=False),
    Setting("engine", TEXT, "auto", "auto (default): plain TCP/Unix request/reply and UDP on "
            "the epoll engine, the rest on asyncio transports; asyncio: everything on "
            "transports", _RUN, choices=("auto", "asyncio"), reloadable=False),
    # A client's next request usually lands inside the spin, saving a sleep and wake-up.
    Setting("busy_poll_us", INT, 50, "after a batch of requests keep polling this long before "
            "sleeping; a client's next request usually arrives within it (default 50; 0 = off)",
            _RUN, "server", reloadable=False, metavar="USEC", aliases=("--busy-poll",),
            combine=max),
    # Threads start as blocking handlers need them; a handler that never blocks uses none.
    Setting("handler_threads", INT, 32, "threads that run blocking def handlers (one seen to "
            "block the event loop, or marked blocking) (default 32)", _RUN, "server",
            reloadable=False, metavar="N", combine=max),
    Setting("blocking", FLAG, False, "run this service's def handler in the handler threads "
            "from its first request (default: inline until it is seen to block the loop)", _RUN),
    Setting("nonblocking", FLAG, False, "always run this service's def handler inline on the "
            "event loop, even when it is slow", _RUN),
    Setting("proxy_protocol", FLAG, False, "stream connections must start with a PROXY v1/v2 "
            "header (HAProxy send-proxy); ctx.peer and the logs show the real client, "
            "--allow/--deny apply to it", _PROXY),
    Setting("proxy_from", NETWORKS, (), "accept connections only from these proxies "
            "(repeatable; default: any)", _PROXY, metavar="CIDR"),
    Setting("proxy_header_timeout", SECONDS, 5.0, "close connections whose PROXY header is not "
            "complete by then (default 5)", _PROXY, metavar="SECONDS"),
    Setting("service_options", OPTIONS, {}, "an option of the service, repeatable (qotd: "
            "quotes=FILE); in a config file the table options = {...}", "service options",
            metavar="KEY=VALUE", toml_aliases=("options",)),
    Setting("trace", FLAG, False, "log every request and reply as a hex dump (like socat -v), "
            "on every transport", _RUN),
)
# fmt: on

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SERVER_WIDE = tuple(s for s in SETTINGS if s.scope == "server")


def default(name: str) -> Any:
    """The declared default of ``name`` (a fresh dict for a dict default, never a shared one)."""
    value = BY_NAME[name].default
    return dict(value) if isinstance(value, dict) else value


def not_reloadable(changed: Iterable[str]) -> list[str]:
    """Of the ``changed`` setting names, those a reload cannot apply (they need a restart)."""
    return [n for n in changed if n in BY_NAME and not BY_NAME[n].reloadable]


def _shown(value: Any) -> str:
    if value is None or value == () or value == {}:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def settings_table() -> str:
    """The Markdown table of docs/configuration.md, generated so it cannot go stale."""
    rows = [
        "| option / key | kind | default | scope | reload | effect |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        spelled = ", ".join(f"`{o}`" for o in s.options)
        keys = ", ".join(f"`{k}`" for k in (s.name, *s.toml_aliases))
        kind = "\\|".join(s.choices) if s.choices else s.kind.name
        shown = _shown(s.default)
        reload = "yes" if s.reloadable else "restart"
        text = s.help.replace("|", "\\|")
        rows.append(f"| {spelled} / {keys} | {kind} | {shown} | {s.scope} | {reload} | {text} |")
    return "\n".join(rows) + "\n"
