"""sockserve: serve, call and load-test request/response services over TCP, UDP and Unix sockets.

Every name below is imported on first use (PEP 562), so ``import sockserve``
costs nothing and ``sockserve call`` / ``sockserve.connect`` load only the
blocking client, never asyncio or uvloop.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .api import serve
    from .client.aio import AsyncClient, aconnect
    from .client.blocking import Client, connect
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
        ReplyTooLarge,
        RequestTimeout,
        RequestTooLarge,
        ServiceError,
        SockserveError,
        TLSFileError,
    )
    from .server import Server, ServerConfig, ServerThread
    from .service import Context, Service, StreamSession, blocking, nonblocking

#: Where each public name that is not an error class lives (the errors are all in
#: sockserve.errors); importing it is put off until the name is first used.
_HOMES: dict[str, str] = {
    "Client": "sockserve.client",
    "connect": "sockserve.client",
    "Endpoint": "sockserve.endpoints",
    "parse_endpoint": "sockserve.endpoints",
    "Context": "sockserve.service",
    "Service": "sockserve.service",
    "StreamSession": "sockserve.service",
    "blocking": "sockserve.service",
    "nonblocking": "sockserve.service",
    "AsyncClient": "sockserve.client.aio",
    "aconnect": "sockserve.client.aio",
    "serve": "sockserve.api",
    "Server": "sockserve.server",
    "ServerConfig": "sockserve.server",
    "ServerThread": "sockserve.server",
}


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'sockserve' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_HOMES.get(name, "sockserve.errors")), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
    "ReplyTooLarge",
    "RequestTimeout",
    "RequestTooLarge",
    "Server",
    "ServerConfig",
    "ServerThread",
    "Service",
    "ServiceError",
    "SockserveError",
    "StreamSession",
    "TLSFileError",
    "aconnect",
    "blocking",
    "connect",
    "nonblocking",
    "parse_endpoint",
    "serve",
]
