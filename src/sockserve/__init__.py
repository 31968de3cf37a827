"""sockserve: serve, call and load-test request/response services over TCP, UDP and Unix sockets.

Light on import: the server side (asyncio, uvloop) loads only when a server
name is first used, so ``sockserve call`` and ``sockserve.connect`` start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import Client, connect
from .endpoints import Endpoint, parse_endpoint
from .errors import (
    ClientError,
    ConfigError,
    ConnectError,
    ConnectionClosed,
    EndpointError,
    LocalProtocolError,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    RequestTimeout,
    ServiceError,
    SockserveError,
)
from .service import Context, Service, StreamSession

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .aclient import AsyncClient, aconnect
    from .api import serve
    from .server import Server, ServerConfig, ServerThread

_LAZY = {
    "AsyncClient": "sockserve.aclient",
    "aconnect": "sockserve.aclient",
    "serve": "sockserve.api",
    "Server": "sockserve.server",
    "ServerConfig": "sockserve.server",
    "ServerThread": "sockserve.server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sockserve' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "ConfigError",
    "ConnectError",
    "ConnectionClosed",
    "Context",
    "Endpoint",
    "EndpointError",
    "LocalProtocolError",
    "MessageTooLarge",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestTimeout",
    "Server",
    "ServerConfig",
    "ServerThread",
    "Service",
    "ServiceError",
    "SockserveError",
    "StreamSession",
    "aconnect",
    "connect",
    "parse_endpoint",
    "serve",
]
