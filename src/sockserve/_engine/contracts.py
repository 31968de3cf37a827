"""What the engine's parts say to each other, in one leaf module that imports no other.

A connection reports to its owner (:class:`ConnOwner`: the runtime that accepted it)
and never reaches past it; a runtime reports to its host (:class:`RuntimeHost`: the
server) through this small interface, and shares the server-wide connection count
and limit through one :class:`ConnectionBudget`. Why Protocols rather than imports:
``sockserve.server`` embeds the engine, so the engine must not import it back.

Also here, because every part needs them: why a connection closed
(:class:`CloseReason`, with the metrics kind and log level it implies), how an
error is worded in a log line, and giving freed memory back after a wave of
connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..config import ServerConfig
from ..endpoints import Endpoint
from ..service import Context, Service

if TYPE_CHECKING:
    from ..framing import Codec


class CloseReason(enum.Enum):
    """Why a connection closed: its log text, its metrics ``kind`` (None: not an error)
    and the level of its ``close`` line."""

    CLOSED = ("closed", "", None, logging.INFO)
    #: The transport or socket failed (the detail says how): counted as a reset.
    ERROR = ("error", ": ", "reset", logging.INFO)
    PROTOCOL = ("protocol error", ": ", "protocol", logging.WARNING)
    PROXY = ("PROXY header", ": ", "proxy", logging.INFO)
    IDLE = ("idle for", " ", "idle_timeout", logging.INFO)
    DRAIN_TIMEOUT = ("drain timeout", " ", "drain_timeout", logging.INFO)
    DENIED = ("denied", " ", "denied", logging.INFO)
    #: The handler raised or returned what is not bytes (logged, and counted, by the service).
    HANDLER = ("handler error", " ", None, logging.INFO)

    def __init__(self, label: str, joiner: str, kind: str | None, level: int) -> None:
        self.label = label
        self.joiner = joiner
        self.kind = kind
        self.level = level

    def text(self, detail: str = "") -> str:
        """The reason as the ``close`` log line words it, e.g. ``protocol error: too long``."""
        return f"{self.label}{self.joiner}{detail}" if detail else self.label


class Conn(Protocol):
    """A stream connection as its owner sees it (request/reply, session, PROXY header)."""

    ctx: Context
    #: Set on each request; the idle sweeper clears it and times idleness from idle_since.
    active: bool
    idle_since: float
    closing: bool

    @property
    def busy(self) -> bool:
        """A request is queued or running: draining and the idle sweep wait for it."""

    def drain(self) -> None:
        """Read nothing more, answer what was read, then close."""

    def close(self) -> None: ...

    def abort(self) -> None: ...


class Calls(Protocol):
    """How a handler is called (:class:`~.requests.HandlerCalls`), as connections ask it."""

    is_async: bool
    #: A ``def`` handler run inline on the loop; ``auto``: watched (a call that blocks
    #: moves it to the threads); ``fast_ok``: the C fast path may call it.
    inline: bool
    auto: bool
    fast_ok: bool

    def took(self, started: float) -> None: ...  # an inline call begun at perf_counter() ended


class ConnOwner(Protocol):
    """What a connection reports to (the runtime of its listener), and all it may use."""

    loop: asyncio.AbstractEventLoop
    endpoint: Endpoint
    config: ServerConfig
    service: Service
    handler: Any
    is_async: bool

    @property
    def calls(self) -> Calls: ...

    def opened(self, conn: Conn) -> None:
        """The connection is set up: counted, logged, swept for idleness."""

    def closed(self, conn: Conn, exc: Exception | None) -> None:
        """The connection is gone (a no-op for one not opened, or handed over)."""

    def note_close_reason(self, conn: Conn, reason: CloseReason, detail: str = "") -> None:
        """Why ``conn`` is about to close, for its close line and the metrics."""

    def hold(self, conn: Conn) -> None:
        """Track ``conn`` (drain, idle sweep) before it is opened: a PROXY header is awaited."""

    def release(self, conn: Conn) -> None:
        """Stop tracking a held ``conn``: its slot goes to the protocol it hands over to."""


class QueueHost(Conn, Protocol):
    """The transport side of a connection, as its :class:`~.requests.RequestQueue` drives it."""

    #: The peer has half-closed: reading never restarts.
    eof: bool

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet a whole request."""

    def send_reply(self, reply: object) -> None:
        """Encode and write one reply (None: nothing to send; not bytes: a handler error)."""

    def stop_reading(self) -> None: ...

    def can_resume(self) -> bool:
        """Reading may restart (not closing, still connected)."""

    def start_reading(self) -> None: ...

    def codec_now(self) -> Codec:
        """The connection's codec, made if it has none yet."""


class BoundSocket(Protocol):
    """A listening (or datagram) socket and the endpoint it really serves."""

    @property
    def sock(self) -> socket.socket: ...

    @property
    def endpoint(self) -> Endpoint: ...


class Accepting(Protocol):
    """A stream runtime as the :class:`ConnectionBudget` sees it."""

    def below_limit(self) -> None:
        """A slot is free again: resume accepting if paused at the limit."""


class Poller(Protocol):
    """The epoll hub as runtimes and connections use it (:class:`~.epoll.Hub`)."""

    def add(self, fd: int, member: Any, events: int) -> None: ...

    def modify(self, fd: int, events: int) -> None: ...

    def remove(self, fd: int) -> None: ...

    def set_fast(self, fd: int, spec: Any) -> None: ...  # fd's fast-path spec now, or None

    #: Its members' tasks running: it does not busy-poll meanwhile.
    pending: int

    def task_done(self, task: asyncio.Task[None]) -> None: ...  # a pending task ended

    def refresh_fast(self) -> None:
        """Drop the fast-path entries of connections whose handler may not run there now."""

    def rescan(self) -> None:
        """Put connections whose handler may run on the fast path again back on it."""


class RuntimeHost(Protocol):
    """What a runtime reports to (the server)."""

    loop: asyncio.AbstractEventLoop
    budget: ConnectionBudget

    @property
    def hub(self) -> Poller | None:
        """The epoll hub, where the server has one (Linux, some binding on ``engine=auto``)."""

    @property
    def stopping(self) -> bool:
        """The whole server is shutting down (not just one binding retired)."""

    def track(self, fut: asyncio.Future[Any]) -> None:
        """Cancel ``fut`` if it is still running when the server stops."""

    def endpoint_lost(self, endpoint: Endpoint) -> None:
        """``endpoint`` cannot be served any more (logged): stop the server, failing."""

    def datagram_ports(self) -> list[int]:
        """The ports this server serves UDP on (a datagram from one may start a loop)."""

    @property
    def handler_pool(self) -> HandlerPool:
        """The threads blocking ``def`` handlers run in, server-wide."""


class EndpointRuntime:
    """What a stream and a datagram runtime both hold: the host they report to, their
    socket and its endpoint, the service and its settings."""

    def __init__(
        self, host: RuntimeHost, listener: BoundSocket, service: Service, config: ServerConfig
    ) -> None:
        self.host = host
        self.loop = host.loop
        self.listener = listener
        self.endpoint: Endpoint = listener.endpoint
        self.service = service
        self.config = config


class ConnectionBudget:
    """The server-wide count of open connections and its limit (``max_conns``).

    A stream runtime takes a slot per accepted connection and gives it back when the
    connection closes or fails to set up. At the limit each runtime stops accepting
    (clients wait in the kernel's backlog); when a slot frees, every runtime that joined
    is told, since the one paused at the limit need not be the one whose connection
    closed (the limit is shared by every listener).
    """

    __slots__ = ("_count", "_empty", "_runtimes", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self._count = 0
        self._runtimes: list[Accepting] = []
        self._empty: asyncio.Event | None = None

    @property
    def count(self) -> int:
        """Connections open or being set up (a TLS handshake), server-wide."""
        return self._count

    def at_limit(self) -> bool:
        return self.limit is not None and self._count >= self.limit

    def join(self, runtime: Accepting) -> None:
        self._runtimes.append(runtime)

    def leave(self, runtime: Accepting) -> None:
        if runtime in self._runtimes:
            self._runtimes.remove(runtime)

    def take(self) -> None:
        """A connection was accepted."""
        self._count += 1

    def give_back(self) -> None:
        """A connection closed, or failed before it was set up."""
        self._count -= 1
        if self._count <= 0 and self._empty is not None:
            self._empty.set()
        self._slot_freed()

    def set_limit(self, limit: int | None) -> None:
        """A reload changed the limit: a raised one resumes listeners paused at the old."""
        self.limit = limit
        self._slot_freed()

    async def wait_empty(self) -> None:
        """Return once no connection is open."""
        if self._count > 0:
            self._empty = asyncio.Event()
            await self._empty.wait()

    def _slot_freed(self) -> None:
        if self.limit is None or self.at_limit():
            return
        for runtime in list(self._runtimes):
            runtime.below_limit()


class HandlerPool:
    """The server's threads for blocking ``def`` handlers (``--handler-threads``).

    Why not ``concurrent.futures.ThreadPoolExecutor``: its threads are joined at
    interpreter exit, so a handler stuck in ``time.sleep(60)`` would keep the process
    alive after the drain timeout; these are daemon threads, started only as jobs need
    them (none while no handler blocks). ``calls``: each handler's ``HandlerCalls`` on
    this server (one, so a handler on several endpoints is moved, and logged, once).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.calls: dict[tuple[int, bool | None], Any] = {}
        self._jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads = 0

    def run(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a thread: an ``asyncio.Future`` of ``loop`` with its result."""
        fut = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if self._threads < self.size:
                    self._threads += 1
                    name = f"sockserve-handler-{self._threads}"
                    threading.Thread(target=self._work, name=name, daemon=True).start()
        return fut

    def _work(self) -> None:
        while True:
            loop, fut, fn, args = self._jobs.get()
            try:
                ok, value = True, fn(*args)
            except BaseException as exc:  # SystemExit too: the handler's failure, on the loop
                ok, value = False, exc
            with contextlib.suppress(RuntimeError):  # closed: nobody waits for this reply
                loop.call_soon_threadsafe(_settle, fut, ok, value)
            del loop, fut, fn, args, value  # no reference to the last job while idle
            self._idle.release()


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if not fut.done():  # cancelled: the connection closed while the handler ran
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


#: Give freed memory back to the OS (malloc_trim) once a listener's connections fall to
#: a quarter of their peak, when that peak was at least this many: a wave of connections
#: that all closed (glibc keeps what they freed, 50-300 KB each for TLS, for good).
TRIM_PEAK = 256
#: ...at most this often per process (a trim walks the whole heap: milliseconds).
TRIM_EVERY = 1.0

_trim: Callable[[int], int] | None = None
_last_trim = -TRIM_EVERY
_trim_scheduled_for = -TRIM_EVERY  # a loop that closes first just never runs it


def _load_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (musl, other systems)."""
    try:
        import ctypes

        return cast(Callable[[int], int], ctypes.CDLL(None).malloc_trim)
    except (OSError, AttributeError, ImportError):
        return None


def release_memory(loop: asyncio.AbstractEventLoop) -> None:
    """Give the heap's free memory back to the OS, at most once per TRIM_EVERY.

    Why: glibc keeps memory that many connections freed at once (TLS buffers, socket
    reads) in its arenas, and RSS stays at the peak of the largest wave for good;
    ``malloc_trim(0)`` returns it. Delayed a little, so a wave that is still closing
    costs one trim, not one per connection.
    """
    global _trim, _trim_scheduled_for
    if _trim is None:
        _trim = _load_trim() or (lambda pad: 0)
    now = time.monotonic()
    if now < _trim_scheduled_for:
        return  # one is due already
    _trim_scheduled_for = max(now + 0.05, _last_trim + TRIM_EVERY)
    loop.call_later(_trim_scheduled_for - now, _run_trim)


def _run_trim() -> None:
    global _last_trim
    _last_trim = time.monotonic()
    if _trim is not None:
        _trim(0)


def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
