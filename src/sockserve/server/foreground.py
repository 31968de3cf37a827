"""Running a :class:`~sockserve.server.Server` in the foreground of a process: its own event
loop, and SIGTERM/SIGINT as a graceful stop (a second SIGINT forces it).

The handlers are Python-level (``signal.signal``), not ``loop.add_signal_handler``: they
also run while a sync handler blocks the loop, and arm a watchdog that ends the process by
the drain timeout (or at once after a second SIGINT) if the loop cannot get there itself
(see :mod:`sockserve._engine.signals`). They only set flags: the stop runs on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from .._engine.signals import StopSignals
from ..endpoints import Endpoint
from ..logs import server_log
from .loop import log_loop_exception, new_event_loop


class Server(Protocol):
    """What running in the foreground needs of :class:`sockserve.server.Server`."""

    signals: StopSignals | None
    forced: bool
    lost: list[Endpoint]
    drain_timeout: float

    async def serve_forever(self) -> None: ...

    @property
    def stop_requested(self) -> bool: ...

    def request_stop(self, force: bool = False) -> None: ...

    def remove_socket_files(self) -> None: ...


def run(server: Server, loop_kind: str = "auto", *, handle_signals: bool = True) -> int:
    """Serve on a new event loop until stopped; 0 graceful, 1 forced or an endpoint lost."""
    loop = new_event_loop(loop_kind)
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(log_loop_exception)
    main = loop.create_task(server.serve_forever())
    if handle_signals:
        install_signals(server, loop)
    try:
        loop.run_until_complete(main)
    finally:
        if server.signals is not None:
            server.signals.uninstall()
            server.signals = None
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
    return 1 if server.forced or server.lost else 0


def install_signals(server: Server, loop: asyncio.AbstractEventLoop) -> None:
    """SIGTERM/SIGINT stop ``server`` gracefully on ``loop``; a second SIGINT forces it."""

    def on_signal(name: str) -> None:
        if server.stop_requested and name == "SIGINT":
            server_log.warning("second SIGINT: forcing exit", extra={"event": "force"})
            server.request_stop(force=True)
            return
        server_log.info("%s received: shutting down", name, extra={"event": "signal"})
        server.request_stop()

    server.signals = StopSignals(
        loop.call_soon_threadsafe,
        on_signal,
        lambda: server.drain_timeout,
        lambda: server.stop_requested,
        server.remove_socket_files,
    )
    server.signals.install()
