"""``sockserve.serve(handler, *urls, **options)``: run a server from code until a signal."""

from __future__ import annotations

from typing import Any

from .config import ServerConfig
from .endpoints import Endpoint
from .server.server import Server
from .service import Handler, Service


def serve(
    handler: Handler | Service | str,
    *urls: str | Endpoint,
    config: ServerConfig | None = None,
    loop: str = "auto",
    **options: Any,
) -> int:
    """Serve ``handler`` on ``urls`` (default: TCP and UDP 127.0.0.1:21567) until SIGTERM/SIGINT.

    ``options`` are :class:`ServerConfig` fields (``framing="line"``, ``idle_timeout=60``...).
    Returns the exit status: 0 after a graceful drain, 1 if forced or an endpoint was lost.
    Logs its "listening on" lines to stderr as the CLI does, unless the program has
    configured logging itself.
    """
    from .logs import ensure_logging

    ensure_logging()
    return Server(handler, *urls, config=config, **options).run(loop)
