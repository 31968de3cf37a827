"""``--config services.toml``: several services in one process, inetd-style.

Each ``[[service]]`` table names a service (a built-in or ``module:function``), the
URLs it listens on, and its options, with the same names as the ``serve`` flags
(underscores for dashes)::

    [[service]]
    name = "timestamp"
    listen = ["tcp://127.0.0.1:21567", "udp://127.0.0.1:21567"]

    [[service]]
    name = "echo"
    listen = ["unix:///run/sockserve/echo.sock"]
    framing = "line"
    idle_timeout = 60
    allow = ["10.0.0.0/8"]

The option keys are declared in :mod:`sockserve.settings`, which every front end reads.
``socket`` (default: ``name``) is the systemd ``FileDescriptorName=`` whose inherited
sockets this service serves under socket activation. Options not given come from
the command line's (so ``--proxy-protocol`` applies to every service unless a
table says otherwise). Error handling: every mistake is a :class:`ConfigError`
naming the file, the table and the key.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import ServerConfig, blame
from ..endpoints import Endpoint, parse_endpoint
from ..errors import ConfigError, EndpointError
from ..settings import SETTINGS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]


@dataclass(frozen=True)
class ServiceEntry:
    """One ``[[service]]`` table, checked."""

    spec: str
    endpoints: tuple[Endpoint, ...]
    config: ServerConfig
    socket: str
    where: str  # "services.toml: [[service]] #2 (echo)", for messages


def _option_keys() -> dict[str, tuple[str, Callable[[Any], Any]]]:
    """TOML key -> (ServerConfig field, converter), from the settings declaration."""
    keys: dict[str, tuple[str, Callable[[Any], Any]]] = {}
    for s in SETTINGS:
        for key in (s.name, *s.toml_aliases):
            keys[key] = (s.name, s.kind.toml)
    return keys


#: Keys of a [[service]] table that are ServerConfig fields, and how each is checked.
OPTION_KEYS = _option_keys()
_OWN_KEYS = ("name", "listen", "socket")


def load_config_file(path: str, base: ServerConfig | None = None) -> list[ServiceEntry]:
    """Read and check ``path``; ``base`` supplies options a table leaves out."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path, base)


def parse_config(
    data: dict[str, Any], path: str = "<config>", base: ServerConfig | None = None
) -> list[ServiceEntry]:
    base = (base or ServerConfig()).replace(service_options={})
    extra = sorted(set(data) - {"service"})
    if extra:
        raise ConfigError(
            f"{path}: unknown top-level key {extra[0]!r}; services go in [[service]] tables"
        )
    tables = data.get("service")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[service]] tables; add at least one")
    entries = [_entry(t, f"{path}: [[service]] #{i}", base) for i, t in enumerate(tables, 1)]
    seen: dict[Endpoint, str] = {}
    for entry in entries:
        for ep in entry.endpoints:
            if ep in seen:
                raise ConfigError(f"{entry.where}: {ep} is already served by {seen[ep]}")
            seen[ep] = entry.where
    return entries


def _entry(table: Any, where: str, base: ServerConfig) -> ServiceEntry:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: key 'name' is required: a built-in service or module:function")
    where = f"{where} ({name})"
    unknown = sorted(set(table) - set(OPTION_KEYS) - set(_OWN_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; expected one of "
            f"{', '.join((*_OWN_KEYS, *OPTION_KEYS))}"
        )
    listen = table.get("listen", [])
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not all(isinstance(u, str) for u in listen):
        raise ConfigError(f"{where}: key 'listen': expected a list of endpoint URLs")
    try:
        endpoints = tuple(parse_endpoint(u) for u in listen)
    except EndpointError as exc:
        raise ConfigError(f"{where}: key 'listen': {exc}") from None
    socket_name = table.get("socket", name)
    if not isinstance(socket_name, str):
        raise ConfigError(f"{where}: key 'socket': expected a string (a FileDescriptorName)")
    changes: dict[str, Any] = {}
    given: dict[str, str] = {}  # field -> the key that set it
    for key, (field_name, convert) in OPTION_KEYS.items():
        if key not in table:
            continue
        if field_name in given:
            raise ConfigError(f"{where}: keys {given[field_name]!r} and {key!r} set one option")
        given[field_name] = key
        try:
            changes[field_name] = convert(table[key])
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{where}: key {key!r}: {exc}") from None
    try:
        config = base.replace(**changes)
    except ConfigError as exc:
        culprit = blame(base, changes)
        named = f" (key {given[culprit]!r})" if culprit is not None else ""
        raise ConfigError(f"{where}: {exc}{named}") from None
    return ServiceEntry(name, endpoints, config, socket_name, where)
