"""The server side: endpoints bound to services on one event loop."""

from __future__ import annotations

from ..config import ServerConfig
from .binding import DEFAULT_URLS, Binding, make_binding
from .server import Server
from .thread import ServerThread

__all__ = ["DEFAULT_URLS", "Binding", "Server", "ServerConfig", "ServerThread", "make_binding"]
