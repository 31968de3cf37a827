"""The plan of ``sockserve serve``: what it was asked for (from the command line or a
``--config`` file), turned into units (endpoint + service + options) and the server-wide
settings, checked without binding anything.

:func:`check` is ``serve --check``: every step that can refuse a setting (keys, types,
ranges, endpoint URLs, service imports, TLS files) runs, and nothing is bound.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import ServerConfig
from ..endpoints import Endpoint, parse_endpoint
from ..errors import ConfigError
from ..server.binding import DEFAULT_URLS, Binding, make_binding
from ..server.listeners import Listener
from ..server.tls import server_context
from ..settings import SERVER_WIDE
from .activation import InheritedSocket
from .configfile import ServiceEntry, load_config_file

if TYPE_CHECKING:
    from .metrics import MetricsState


@dataclass
class AppSpec:
    """Everything ``serve`` was asked for; picklable, so workers get the same."""

    service: str = "timestamp"
    urls: tuple[str, ...] = ()
    config: ServerConfig = field(default_factory=ServerConfig)
    config_file: str | None = None
    metrics: str | None = None
    workers: int = 1
    loop: str = "auto"
    log_format: str = "text"
    log_level: str = "info"
    access_log: bool = True


@dataclass
class Unit:
    """One endpoint, its service and options, and a socket to serve if one was passed in."""

    key: Endpoint  # as configured (the diff key), or the inherited socket's own address
    spec: str
    config: ServerConfig
    listener: Listener | None = None
    port: int | None = None  # a port the supervisor reserved for a configured port 0

    @property
    def endpoint(self) -> Endpoint:
        return self.key.with_port(self.port) if self.port is not None else self.key

    def same_as(self, other: Unit) -> bool:
        return (
            self.spec == other.spec
            and self.config == other.config
            and self.listener is other.listener
            and self.port == other.port
        )


@dataclass
class Plan:
    """Sockets and ports handed to this process (by systemd or the supervisor)."""

    inherited: list[InheritedSocket] = field(default_factory=list)
    prebound: dict[str, Listener] = field(default_factory=dict)  # configured URL -> socket
    ports: dict[str, int] = field(default_factory=dict)  # configured URL -> reserved port
    worker: bool = False  # bind inet endpoints with SO_REUSEPORT, beside the other workers


def service_entries(spec: AppSpec) -> list[ServiceEntry]:
    if spec.config_file:
        return load_config_file(spec.config_file, spec.config)
    endpoints = tuple(parse_endpoint(u) for u in (spec.urls or DEFAULT_URLS))
    return [ServiceEntry(spec.service, endpoints, spec.config, spec.service, "command line")]


def plan_units(spec: AppSpec, plan: Plan) -> list[Unit]:
    """The units to serve: inherited sockets first (by name), then the configured endpoints.

    Under socket activation without a config file every passed socket serves the
    command line's service and its default endpoints are not bound; with a config
    file each socket goes to the ``[[service]]`` whose ``socket`` (default ``name``)
    equals its ``FileDescriptorName``, and services that got none bind their ``listen``.
    """
    entries = service_entries(spec)
    units: list[Unit] = []
    served: set[int] = set()
    for inh in plan.inherited:
        if spec.config_file:
            matches = [i for i, e in enumerate(entries) if e.socket == inh.name]
            if not matches:
                raise ConfigError(
                    f"{spec.config_file}: inherited socket {inh.listener.endpoint} (fd {inh.fd}, "
                    f"name {inh.name!r}) matches no [[service]]; set socket = {inh.name!r} on one"
                )
            index = matches[0]
        else:
            index = 0
        served.add(index)
        e = entries[index]
        units.append(Unit(inh.listener.endpoint, e.spec, e.config, inh.listener))
    if plan.inherited and not spec.config_file:
        return units
    for i, e in enumerate(entries):
        if i in served:
            continue
        if not e.endpoints:
            raise ConfigError(f"{e.where}: no 'listen' URLs and no inherited socket {e.socket!r}")
        for ep in e.endpoints:
            url = ep.url()
            cfg = e.config
            lst = plan.prebound.get(url)
            if plan.worker and lst is None and ep.is_inet:
                cfg = cfg.replace(reuse_port=True)
            units.append(Unit(ep, e.spec, cfg, lst, plan.ports.get(url)))
    seen: set[Endpoint] = set()
    for u in units:
        if u.key in seen:
            raise ConfigError(f"{u.key} is listed twice")
        seen.add(u.key)
    return units


def build_binding(unit: Unit, metrics: MetricsState | None) -> Binding:
    binding = make_binding(unit.spec, [unit.endpoint], unit.config)
    if unit.listener is not None:
        binding.listeners[unit.endpoint] = unit.listener
    return metrics.instrument(binding) if metrics is not None else binding


def server_config(spec: AppSpec, units: list[Unit]) -> ServerConfig:
    """The server-wide settings of one process: each combines the units' values (the
    smallest ``max_conns``, the longest ``drain_timeout``, ...), as the settings declare."""
    changes = {}
    for s in SERVER_WIDE:
        assert s.combine is not None, f"server-wide setting {s.name} says how tables combine"
        changes[s.name] = s.combine(getattr(u.config, s.name) for u in units)
    return spec.config.replace(**changes)


def load_tls(binding: Binding) -> None:
    """Build a tls:// binding's context now; ConfigError (naming the file) if it cannot load."""
    if binding.ssl_context is None and any(ep.scheme == "tls" for ep in binding.endpoints):
        cfg = binding.config
        binding.ssl_context = server_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)


def differences(old: Unit, new: Unit) -> list[str]:
    """What a reload changed in a unit: "service", setting names, "socket"."""
    names = ["service"] if old.spec != new.spec else []
    names += [
        f.name
        for f in dataclasses.fields(ServerConfig)
        if getattr(old.config, f.name) != getattr(new.config, f.name)
    ]
    if old.listener is not new.listener or old.port != new.port:
        names.append("socket")
    return names or ["nothing"]


def check(spec: AppSpec, inherited: list[InheritedSocket] | None = None) -> str:
    """``serve --check``: refuse ``spec`` as ``serve`` would at start, binding nothing.

    Returns a one-line summary. Error handling: raises the first ConfigError,
    EndpointError or ServiceError, prefixed with where it is (``file: [[service]] #N``).
    """
    from ..errors import SockserveError

    units = plan_units(spec, Plan(inherited=inherited or []))
    entries = service_entries(spec)
    for entry in entries:
        try:
            binding = make_binding(entry.spec, entry.endpoints or DEFAULT_URLS, entry.config)
            load_tls(binding)
        except SockserveError as exc:
            raise type(exc)(f"{entry.where}: {exc}") from None
        except ImportError as exc:  # a module that imports, then fails to import its own
            raise ConfigError(f"{entry.where}: service {entry.spec!r}: {exc}") from None
    server_config(spec, units)
    source = spec.config_file or "command line"
    services = len(entries)
    return f"{source}: OK ({_count(services, 'service')}, {_count(len(units), 'endpoint')}; nothing bound)"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
