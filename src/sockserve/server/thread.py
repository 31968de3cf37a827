"""Run a :class:`Server` on its own event loop in a background thread, for sync code and tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from ..endpoints import Endpoint
from .loop import log_loop_exception, new_event_loop
from .server import Server


class ServerThread:
    """Run a :class:`Server` on its own loop in a background thread (tests, embedding).

    ``with ServerThread(server) as st: st.endpoints`` starts it, waits until it is
    bound (raising its bind error if it failed), and stops it gracefully on exit.
    """

    def __init__(
        self, server: Server, loop_kind: str = "auto", start_timeout: float = 10.0
    ) -> None:
        self.server = server
        self._loop_kind = loop_kind
        self._timeout = start_timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="sockserve-server", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.server.endpoints

    def url(self, scheme: str | None = None) -> str:
        for ep in self.server.endpoints:
            if scheme is None or ep.scheme == scheme:
                return ep.url()
        raise LookupError(f"no {scheme} endpoint")

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError("server did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        loop = new_event_loop(self._loop_kind)
        self._loop = loop
        loop.set_exception_handler(log_loop_exception)
        asyncio.set_event_loop(loop)

        async def body() -> None:
            try:
                await self.server.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            assert self.server._stop_requested is not None
            await self.server._stop_requested.wait()
            await self.server.stop()

        try:
            loop.run_until_complete(body())
        finally:
            loop.close()

    def stop(self, timeout: float = 30.0) -> None:
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.server.request_stop)
        self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
