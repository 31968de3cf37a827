"""A binding: one service on some endpoints with its settings, the unit a :class:`Server` runs."""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..config import ServerConfig
from ..endpoints import Endpoint, parse_endpoint
from ..errors import ConfigError
from ..service import Handler, Service, traced
from ..services import as_service, load_service
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
