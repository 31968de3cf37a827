"""The server object: binds endpoints to services, runs them on one event loop, drains on stop.

Lifecycle (uvicorn's shape): ``start`` binds every endpoint and logs one line
each; ``stop`` stops accepting at once, lets in-flight requests finish and their
replies flush for up to the drain timeout, then closes whatever is left.
Signal handlers only set flags. The library never calls ``sys.exit``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from .._engine.contracts import ConnectionBudget, HandlerPool
from .._engine.datagram import DatagramRuntime
from .._engine.epoll import HAVE_EPOLL, Hub
from .._engine.runtime import StreamRuntime
from .._engine.signals import StopSignals
from ..config import ServerConfig
from ..endpoints import Endpoint
from ..logs import server_log
from ..service import Handler, Service
from . import foreground
from .binding import DEFAULT_URLS, Binding, bindings_and_config, make_binding
from .listeners import Listener, close_listener, unlink_socket_file
from .runtimes import IdleSweeper, Part, Runtime, abort, drain, open_binding, wait_retired

# Re-exported: older code imports these from here (their home is binding.py).
__all__ = ["DEFAULT_URLS", "Binding", "Server", "make_binding"]


class Server:
    """Serve one or more bindings on one event loop.

    ``Server(handler, "tcp://127.0.0.1:0", framing="line")`` serves one handler (a callable,
    a :class:`~sockserve.Service`, a ``"module:attr"`` string or a built-in service name;
    None is ``"timestamp"``) on the URLs given (default: TCP and UDP 127.0.0.1:21567) with
    ``ServerConfig(**settings)``, or ``config.replace(**settings)``. ``Server(b1, b2)``
    serves :class:`Binding` objects as they are; ``settings`` and ``config`` then give the
    server-wide values (default: the first binding's).

    Run it with ``async with server:`` (bound on entry, drained and closed on exit) and
    ``await server.serve_forever()``, with ``await start()`` / ``await stop()``, with
    :meth:`run` in the foreground, or in a thread with :class:`ServerThread`.

    Error handling: a bad setting raises :class:`ConfigError` naming it, here; an endpoint
    that cannot be bound raises :class:`EndpointError` from ``start`` (``__aenter__``),
    after closing whatever it had bound.
    """

    def __init__(
        self,
        service_or_binding: Binding | Service | Handler | str | None = None,
        /,
        *urls_or_bindings: Binding | str | Endpoint,
        config: ServerConfig | None = None,
        **settings: Any,
    ) -> None:
        self.bindings, self.config = bindings_and_config(
            service_or_binding, urls_or_bindings, config, settings
        )
        #: Server-wide values given here win; otherwise they follow the bindings, also
        #: across a reload.
        given = settings if config is None else {**vars(config), **settings}
        self._given_limits = (given.get("max_conns"), given.get("drain_timeout"))
        self.max_conns: int | None = None
        self.drain_timeout = 0.0
        #: Connections open server-wide and their limit, shared by every stream runtime.
        self.budget = ConnectionBudget()
        #: Threads for blocking def handlers, server-wide (started as they are needed).
        self.handler_pool = HandlerPool(self.config.handler_threads)
        self._update_limits()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.streams: list[StreamRuntime] = []
        self.datagrams: list[DatagramRuntime] = []
        self.listeners: list[Listener] = []
        self.endpoints: list[Endpoint] = []
        self.forced = False
        #: Endpoints lost while serving (their socket failed): the server then stops, and
        #: ``run`` returns 1, rather than running on without them.
        self.lost: list[Endpoint] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self._stop_requested: asyncio.Event | None = None
        #: Closes idle connections (made in start, when the loop is known).
        self._sweeper: IdleSweeper | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        #: The epoll engine's hub, when any binding uses it (created in start).
        self.hub: Hub | None = None
        #: (endpoint as configured, runtime, listener) per binding, by id(binding): for add/remove_binding.
        self._bound: dict[int, list[Part]] = {}
        #: SIGTERM/SIGINT handlers with their watchdog, while installed (install_signals).
        self.signals: StopSignals | None = None

    # -- limits and bookkeeping used by the runtimes ------------------------------------

    def _update_limits(self) -> None:
        """Derive the shared connection limit and the drain timeout from the bindings."""
        max_conns, drain_timeout = self._given_limits
        limits = [b.config.max_conns for b in self.bindings if b.config.max_conns]
        self.max_conns = max_conns if max_conns is not None else (min(limits) if limits else None)
        timeouts = [b.config.drain_timeout for b in self.bindings]
        if drain_timeout is not None or timeouts:
            self.drain_timeout = drain_timeout if drain_timeout is not None else max(timeouts)
        self.budget.set_limit(self.max_conns)  # a raised limit resumes listeners paused at it

    @property
    def conn_count(self) -> int:
        """Stream connections open (or being set up), over every endpoint."""
        return self.budget.count

    def reconfigure(self, config: ServerConfig) -> None:
        """Take new server-wide settings (a reload): the connection limit and drain timeout
        apply at once; listeners paused at a lower limit resume."""
        self.config = config
        self._given_limits = (config.max_conns, config.drain_timeout)
        self._update_limits()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def datagram_ports(self) -> list[int]:
        return [d.endpoint.port for d in self.datagrams if d.inet]

    def endpoint_lost(self, endpoint: Endpoint) -> None:
        """A runtime could not go on serving ``endpoint`` (it logged why): stop, failing."""
        self.lost.append(endpoint)
        self.request_stop()

    def track(self, fut: asyncio.Future[Any]) -> None:
        self._tasks.add(fut)
        fut.add_done_callback(self._tasks.discard)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every endpoint and start serving. Raises EndpointError/ConfigError, binding nothing."""
        self.loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        if HAVE_EPOLL and any(b.config.engine == "auto" for b in self.bindings):
            self.hub = Hub(self.loop, self.config.busy_poll_us / 1e6)  # server-wide
        try:
            for binding in self.bindings:
                self._start_recorded(binding)
        except BaseException:
            for lst in self.listeners:
                close_listener(lst)
            self.listeners.clear()
            if self.hub is not None:
                self.hub.close()
                self.hub = None
            raise
        for rt in self.streams:
            rt.start()
        for drt in self.datagrams:
            drt.start()
        self._sweeper = IdleSweeper(self.loop, self.streams)
        self._sweeper.schedule()

    def _start_recorded(self, binding: Binding) -> None:
        parts: list[Part] = []
        try:
            open_binding(self, binding, parts)
        finally:  # what opened before a failure is recorded, for the caller to close
            for _, rt, lst in parts:
                self.listeners.append(lst)
                self.endpoints.append(lst.endpoint)
                if isinstance(rt, StreamRuntime):
                    self.streams.append(rt)
                else:
                    self.datagrams.append(rt)
        self._bound[id(binding)] = parts

    # -- changing bindings while running (config reload) ---------------------------------

    def runtimes_of(self, binding: Binding) -> list[Runtime]:
        return [rt for _, rt, _ in self._bound.get(id(binding), [])]

    def add_binding(self, binding: Binding) -> None:
        """Start serving one more binding on a running server.

        Error handling: if an endpoint cannot be bound, the sockets this call opened are
        closed and the error propagates; sockets passed in ``binding.listeners`` stay open.
        """
        marks = len(self.listeners), len(self.streams), len(self.datagrams)
        try:
            self._start_recorded(binding)
        except BaseException:
            given = {id(lst) for lst in binding.listeners.values()}
            for lst in self.listeners[marks[0] :]:
                if id(lst) not in given:
                    close_listener(lst)
            del self.listeners[marks[0] :], self.endpoints[marks[0] :]
            del self.streams[marks[1] :], self.datagrams[marks[2] :]
            raise
        self.bindings.append(binding)
        self._update_limits()
        for rt in self.runtimes_of(binding):
            rt.start()
        if self._sweeper is not None:  # the new binding's idle timeout may want a shorter period
            self._sweeper.schedule()

    def remove_binding(
        self, binding: Binding, keep: Iterable[Endpoint] = (), *, keep_conns: bool = False
    ) -> tuple[dict[Endpoint, Listener], asyncio.Task[None]]:
        """Stop accepting for ``binding`` now and drain its connections in the background.

        Listening sockets of the endpoints in ``keep`` (keys as configured) are handed back
        open, for a replacement binding to serve without a gap; the others are closed.
        Returns them and the drain task (done when its connections are closed, or were
        aborted at the drain timeout). With ``keep_conns`` (a reload that replaces the
        binding) open connections are not closed: they are served as they were accepted
        until they end (the client closes, or the idle timeout), so no request a client
        has sent is lost to the reload; the task is done when the last one has closed.
        """
        keep = set(keep)
        pairs = self._bound.pop(id(binding), [])
        if binding in self.bindings:
            self.bindings.remove(binding)
            self._update_limits()
        kept: dict[Endpoint, Listener] = {}
        close_after: list[Listener] = []
        for ep, rt, lst in pairs:
            rt.stop_accepting()
            if keep_conns and isinstance(rt, StreamRuntime):
                rt.serve_out = True
            if lst in self.listeners:
                i = self.listeners.index(lst)
                del self.listeners[i], self.endpoints[i]
            if ep in keep:
                kept[ep] = lst
            elif ep.is_stream:
                close_listener(lst)
            else:
                close_after.append(lst)  # in-flight async replies are sent from it
        runtimes = [rt for _, rt, _ in pairs]
        task = self.loop.create_task(self._wind_down(runtimes, close_after, keep_conns))
        self.track(task)
        return kept, task

    async def _wind_down(
        self, runtimes: list[Runtime], close_after: Iterable[Listener], retire: bool
    ) -> None:
        if retire:
            await wait_retired(runtimes)
        else:
            await drain(self.loop, runtimes, self.drain_timeout)
        self._forget(runtimes, close_after)

    def _forget(self, runtimes: list[Runtime], close_after: Iterable[Listener]) -> None:
        for rt in runtimes:
            if isinstance(rt, StreamRuntime) and rt in self.streams:
                self.streams.remove(rt)
            elif isinstance(rt, DatagramRuntime) and rt in self.datagrams:
                self.datagrams.remove(rt)
        for lst in close_after:
            close_listener(lst)

    def request_stop(self, force: bool = False) -> None:
        """Ask ``serve`` to return (safe from signal handlers: it only sets flags)."""
        if force:
            self.forced = True
            abort(self.streams, self.datagrams)
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting now; let in-flight requests finish up to the drain timeout; close.

        Safe to call more than once and from several tasks: every caller returns when the
        one drain has ended. :meth:`serve_forever` returns then too.
        """
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._stop_requested is not None:
            self._stop_requested.set()
        try:
            await self._drain_and_close(
                self.drain_timeout if drain_timeout is None else drain_timeout
            )
        finally:
            self._stopped.set()

    async def _drain_and_close(self, timeout: float) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for rt in self.streams:
            rt.stop_accepting()
        for drt in self.datagrams:
            drt.stop_accepting()
        # Datagram sockets stay open (not read) until the drain ends: in-flight async
        # replies are sent from them.
        for lst in self.listeners:
            if lst.endpoint.is_stream:
                close_listener(lst)
        server_log.info(
            "stopping: %d connection(s) open, draining up to %gs",
            self.conn_count,
            timeout,
            extra={"event": "stopping"},
        )
        for rt in self.streams:
            rt.drain()
        inflight = [t for d in self.datagrams for t in d.inflight]
        try:
            # Nothing open and nothing in flight: no wait (`--drain-timeout 0` would time
            # out at once and warn about 0 connections).
            if inflight or self.budget.count > 0:
                waits: list[Any] = [self.budget.wait_empty()]
                if inflight:
                    waits.append(asyncio.gather(*inflight, return_exceptions=True))
                await asyncio.wait_for(asyncio.gather(*waits), timeout if not self.forced else 0.01)
        except asyncio.TimeoutError:
            server_log.warning(
                "drain timeout: closing %d connection(s) still open",
                self.conn_count,
                extra={"event": "drain_timeout"},
            )
            abort(self.streams, self.datagrams)
        finally:
            for lst in self.listeners:
                if not lst.endpoint.is_stream:
                    close_listener(lst)
        for task in list(self._tasks):
            task.cancel()
        # Let connection_lost callbacks of aborted transports run.
        await asyncio.sleep(0)
        if self.hub is not None:
            self.hub.close()
        if self.signals is not None:
            self.signals.disarm()  # stopped in time: the watchdog must not end the process
        server_log.info("stopped", extra={"event": "stopped"})

    async def serve_forever(self) -> None:
        """Serve until :meth:`stop` or :meth:`request_stop` is called, or this is cancelled.

        Starts the server first if it is not running (``async with`` already started it);
        either way it has drained and closed when this returns.
        """
        if self._stop_requested is None:
            await self.start()
        assert self._stop_requested is not None
        try:
            await self._stop_requested.wait()
        finally:
            await self.stop()

    #: The older name of :meth:`serve_forever`.
    serve = serve_forever

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def url(self, scheme: str | None = None) -> str:
        """The URL of the first bound endpoint (of ``scheme``, e.g. ``"tcp"``), real port included."""
        for ep in self.endpoints:
            if scheme is None or ep.scheme == scheme:
                return ep.url()
        bound = ", ".join(ep.url() for ep in self.endpoints) or "none (not started)"
        raise LookupError(f"no {scheme} endpoint; bound: {bound}")

    # -- running in the foreground with signals (see foreground.py) ----------------------

    def run(self, loop_kind: str = "auto", *, handle_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT; exit status 0 graceful, 1 forced or an endpoint lost."""
        return foreground.run(self, loop_kind, handle_signals=handle_signals)

    def install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM/SIGINT stop this server gracefully on ``loop``; a second SIGINT forces it."""
        foreground.install_signals(self, loop)

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.is_set()

    def remove_socket_files(self) -> None:
        """Before a hard exit: unlink our Unix socket files, as a graceful stop does."""
        for lst in list(self.listeners):
            unlink_socket_file(lst)
