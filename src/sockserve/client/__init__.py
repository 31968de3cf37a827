"""Clients: :class:`Client` (blocking, ``socket`` only, so ``sockserve call`` starts fast)
and :class:`AsyncClient` (asyncio), imported only when used. ``common`` holds what both
share: their settings, the TLS context and the wording of every error they raise."""

from __future__ import annotations

from .blocking import Client, connect

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .aio import AsyncClient, aconnect

__all__ = ["AsyncClient", "Client", "aconnect", "connect"]


def __getattr__(name: str) -> object:
    # The asyncio client costs an asyncio import: only when asked for.
    if name in ("AsyncClient", "aconnect"):
        from . import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
