"""Run a :class:`Server` on its own event loop in a background thread, for sync code and tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, TypeVar

from ..config import ServerConfig
from ..endpoints import Endpoint
from ..errors import ConfigError
from ..service import Handler, Service
from .binding import Binding
from .loop import log_loop_exception, new_event_loop
from .server import Server

T = TypeVar("T", bound="LoopThread")


class LoopThread:
    """What runs on its own event loop in a background thread: started with :meth:`start`
    (returns once :meth:`_open` is done, raising what it raised), served by :meth:`_serve`
    until :meth:`_request_stop` (called on the loop) ends it. A :class:`ServerThread`, and the
    relay's ``RelayThread``."""

    #: Says what it runs, in its thread's name and its start timeout's message.
    what = "server"

    def __init__(self, loop_kind: str, start_timeout: float) -> None:
        self._loop_kind = loop_kind
        self._timeout = start_timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        name = f"sockserve-{self.what}"
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _open(self) -> None:
        raise NotImplementedError

    async def _serve(self) -> None:
        raise NotImplementedError

    def _request_stop(self) -> None:
        raise NotImplementedError

    def start(self: T) -> T:
        """Start the thread and wait until it is bound; raise its error if binding failed."""
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError(f"{self.what} did not start within {self._timeout:g}s")
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
                await self._open()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._serve()

        try:
            loop.run_until_complete(body())
        finally:
            loop.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask it to stop, and wait up to ``timeout`` for that (a server's drain) to end."""
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._request_stop)
        self._thread.join(timeout)

    def __enter__(self: T) -> T:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerThread(LoopThread):
    """A :class:`Server` on its own event loop in a background thread, for sync code and tests.

    ``ServerThread(handler, *urls, **settings)`` takes what ``Server`` takes (the URLs
    default to TCP and UDP on 127.0.0.1:21567; use port 0 in tests), or a ``Server``.
    ``with ServerThread(...) as st:`` starts it and returns once it is bound, raising its
    bind error if it failed; ``st.endpoints`` / ``st.url("tcp")`` then hold the real ports.
    Leaving the block stops it gracefully (drained like SIGTERM).
    """

    def __init__(
        self,
        server_or_service: Server | Binding | Service | Handler | str | None = None,
        /,
        *urls_or_bindings: Binding | str | Endpoint,
        loop_kind: str = "auto",
        start_timeout: float = 10.0,
        config: ServerConfig | None = None,
        **settings: Any,
    ) -> None:
        if isinstance(server_or_service, Server):
            if urls_or_bindings or config is not None or settings:
                raise ConfigError(
                    "ServerThread: give URLs and settings to Server(...), or pass them "
                    "here instead of a Server, not both"
                )
            self.server = server_or_service
        else:
            self.server = Server(server_or_service, *urls_or_bindings, config=config, **settings)
        super().__init__(loop_kind, start_timeout)

    @property
    def endpoints(self) -> list[Endpoint]:
        """The bound endpoints, in the order given, with the real ports of port-0 URLs."""
        return self.server.endpoints

    def url(self, scheme: str | None = None) -> str:
        """See :meth:`Server.url`."""
        return self.server.url(scheme)

    async def _open(self) -> None:
        await self.server.start()

    async def _serve(self) -> None:
        await self.server.serve_forever()

    def _request_stop(self) -> None:
        self.server.request_stop()
