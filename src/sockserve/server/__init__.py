"""The server side: endpoints bound to services on one event loop."""

from __future__ import annotations

from ..config import ServerConfig
from .server import DEFAULT_URLS, Binding, Server, ServerThread, make_binding

__all__ = ["DEFAULT_URLS", "Binding", "Server", "ServerConfig", "ServerThread", "make_binding"]
