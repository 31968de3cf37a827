"""A binding: one service on some endpoints with its settings, the unit a :class:`Server` runs."""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import ServerConfig
from ..endpoints import Endpoint, parse_endpoint
from ..errors import ConfigError
from ..service import Handler, Service, traced
from ..services import as_service, load_service
from ..settings import SERVER_WIDE as DECLARED_SERVER_WIDE
from .listeners import Listener, check_unix_mode

DEFAULT_URLS = ("tcp://127.0.0.1:21567", "udp://127.0.0.1:21567")


@dataclass
class Binding:
    """One service on some endpoints with its options."""

    service: Service
    endpoints: Sequence[Endpoint]
    config: ServerConfig
    #: Sockets opened elsewhere (systemd, a supervisor, a reload hand-over), served instead of
    #: binding the endpoint of the same key.
    listeners: dict[Endpoint, Listener] = field(default_factory=dict)
    #: The tls:// endpoints' context, when built beforehand (a reload checks the certificate
    #: before it touches anything running); None: built from ``config`` at start.
    ssl_context: ssl.SSLContext | None = None


def make_binding(
    service: Service | Handler | str,
    urls: Iterable[str | Endpoint] = DEFAULT_URLS,
    config: ServerConfig | None = None,
) -> Binding:
    if isinstance(service, str):
        svc = load_service(service)
    else:
        svc = as_service(service, getattr(service, "__name__", "handler"))
    eps = [u if isinstance(u, Endpoint) else parse_endpoint(u) for u in urls]
    if not eps:
        raise ConfigError("no endpoints to listen on")
    cfg = config or ServerConfig()
    for ep in eps:
        check_unix_mode(ep, cfg.unix_mode)
    if cfg.service_options:
        if svc.configure is None:
            names = ", ".join(sorted(cfg.service_options))
            raise ConfigError(f"service {svc.name} takes no options (got {names})")
        svc = svc.configure(dict(cfg.service_options))
    if cfg.trace:
        svc = traced(svc)
    return Binding(svc, eps, cfg)


#: The settings that act on the whole server, not on one binding: given to ``Server`` beside
#: Bindings, they set ``server.config``.
SERVER_WIDE = frozenset(s.name for s in DECLARED_SERVER_WIDE)  # their scope is "server"
_SETTINGS = frozenset(f.name for f in fields(ServerConfig))


def bindings_and_config(
    first: Binding | Service | Handler | str | None,
    rest: tuple[Binding | str | Endpoint, ...],
    config: ServerConfig | None,
    settings: dict[str, Any],
) -> tuple[list[Binding], ServerConfig]:
    """What ``Server(...)`` serves, and its server-wide config; ConfigError naming what is wrong."""
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise ConfigError(f"Server: unknown setting {unknown[0]!r} (not a ServerConfig field)")
    if not isinstance(first, Binding):
        urls = [u for u in rest if not isinstance(u, Binding)]
        if len(urls) < len(rest):
            raise ConfigError("Server: Bindings go first; a service takes URLs, not Bindings")
        cfg = (config or ServerConfig()).replace(**settings)
        service = "timestamp" if first is None else first
        return [make_binding(service, urls or DEFAULT_URLS, cfg)], cfg
    bindings = [first]
    for b in rest:
        if not isinstance(b, Binding):
            raise ConfigError(
                f"Server: {b!r} given after a Binding; give Bindings, or a service and its URLs"
            )
        bindings.append(b)
    local = sorted(set(settings) - SERVER_WIDE)
    if local:
        raise ConfigError(
            f"Server: {local[0]} is a per-service setting: give it to make_binding() (beside "
            f"Bindings, Server takes only the server-wide {', '.join(sorted(SERVER_WIDE))})"
        )
    base = config or first.config
    return bindings, base.replace(**settings) if settings else base
