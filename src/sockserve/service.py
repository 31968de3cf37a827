"""What a service is: a request/reply handler, optionally a stream session for stream endpoints.

A handler is ``handler(request: bytes, ctx) -> bytes | None`` or an ``async def``
of the same; ``None`` means "no reply". Services that are streams rather than
request/reply (echo over TCP, chargen, discard, daytime) subclass
:class:`StreamSession` instead of bending the request/reply contract.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .endpoints import Endpoint
from .errors import ServiceError

Address = Any  # (host, port) tuples for inet, a path string for Unix peers


class Context:
    """Per-connection (stream) or per-datagram facts a handler may use.

    ``peer`` is the client's address (the real client's behind a PROXY header),
    ``local`` the endpoint serving it, ``scheme`` that endpoint's scheme (``"tcp"``,
    ``"udp"``, ``"unix"``, ``"unixgram"``, ``"tls"``).
    """

    __slots__ = ("local", "peer", "scheme", "state")

    def __init__(self, peer: Address, local: Endpoint) -> None:
        self.peer = peer
        self.local = local
        self.scheme: str = local.scheme
        self.state: dict[str, Any] | None = None  # per-connection scratch space for handlers

    @property
    def transport(self) -> str:
        """Deprecated alias of :attr:`scheme`: asyncio code expects a transport object here."""
        global _TRANSPORT_WARNED
        if not _TRANSPORT_WARNED:
            _TRANSPORT_WARNED = True  # once per process: handlers read it on every request
            warnings.warn(
                "Context.transport is deprecated: it is the endpoint's scheme, read ctx.scheme",
                DeprecationWarning,
                stacklevel=2,
            )
        return self.scheme

    def __repr__(self) -> str:
        return f"Context(peer={self.peer!r}, local={self.local.url()!r})"


#: Whether ``Context.transport`` has warned yet.
_TRANSPORT_WARNED = False

SyncHandler = Callable[[bytes, Context], bytes | None]
AsyncHandler = Callable[[bytes, Context], Awaitable[bytes | None]]
Handler = SyncHandler | AsyncHandler


class StreamConnection(Protocol):
    """What the engine offers a :class:`StreamSession`: write, close, and flow-control state."""

    ctx: Context
    #: True once the connection is closing (by the session, the engine's drain, or an
    #: error): writes are dropped, so producers stop.
    closing: bool

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def shutdown_write(self) -> bool | None: ...

    @property
    def writable(self) -> bool:
        """False while the write buffer is above its high-water mark: stop producing."""
        ...

    @property
    def write_room(self) -> int:
        """Bytes that fit before the high-water mark; lets producers size writes to it."""
        ...


class StreamSession:
    """One stream connection of a streaming service. Override what you need.

    The engine calls ``on_connect`` once, ``on_data`` per chunk, ``on_eof`` when the
    peer half-closes (default: close), ``on_writable`` when the write buffer drains
    below its low-water mark, and ``on_close`` once at the end.
    """

    #: Pause reading this connection while its own write buffer is full (echo, chargen: the
    #: input makes the output). False for a session that paces reading itself (a relay
    #: pauses by the far side's buffer, and reads on while only this side's is full).
    pause_on_full = True

    def __init__(self, conn: StreamConnection) -> None:
        self.conn = conn

    def on_connect(self) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        self.conn.close()

    def on_writable(self) -> None:
        pass

    def on_close(self) -> None:
        pass


@dataclass(frozen=True)
class Service:
    """A named service: a request/reply handler and/or a stream session class.

    ``handler`` answers requests (stream endpoints with framing, and datagrams);
    ``stream`` when set takes over stream endpoints; ``datagram`` overrides
    ``handler`` for datagram endpoints. ``replies_larger`` marks services whose
    UDP reply can exceed the request (amplification guard).
    """

    name: str
    handler: Handler | None = None
    stream: type[StreamSession] | None = None
    datagram: Handler | None = None
    description: str = ""
    port: int | None = None
    replies_larger: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    #: Returns a copy set up from ``ServerConfig.service_options`` (qotd's ``quotes`` file);
    #: raises ConfigError for an option it cannot use. None: the service takes no options.
    configure: Callable[[dict[str, Any]], Service] | None = None
    #: ``adopt(owner, hub, sock, peer) -> bool``: offered each plain socket (no TLS, no
    #: PROXY header) accepted on the epoll engine, before any protocol object exists;
    #: True when it took the socket (it then reports to owner as any connection does),
    #: False to serve it as usual (``stream``). The relay's pump joins sockets this way.
    adopt: Callable[[Any, Any, Any, Any], bool] | None = None

    def __post_init__(self) -> None:
        check_handler(self.handler, self.name)
        check_handler(self.datagram, self.name)

    def datagram_handler(self) -> Handler | None:
        return self.datagram if self.datagram is not None else self.handler


def is_async_handler(handler: object) -> bool:
    """True for ``async def`` functions and objects whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - we want the method itself
    return inspect.iscoroutinefunction(call)


#: The attribute :func:`blocking` and :func:`nonblocking` set on a handler.
MODE_ATTR = "__sockserve_blocking__"

H = TypeVar("H", bound=Callable[..., Any])


def blocking(handler: H) -> H:
    """Mark a ``def`` handler as one that blocks (disk, a database driver, ``time.sleep``):
    it runs in the server's handler threads (``--handler-threads``) from its first request,
    instead of inline on the event loop until it is seen to block."""
    return _marked(handler, True)


def nonblocking(handler: H) -> H:
    """Mark a ``def`` handler as one that never blocks: it always runs inline on the event
    loop, even when a call is slow (a long computation better done without a thread hop)."""
    return _marked(handler, False)


def _marked(handler: H, value: bool) -> H:
    if is_async_handler(handler):
        raise ServiceError(
            f"handler {getattr(handler, '__name__', handler)!r} is an async def: it runs on "
            "the event loop; blocking/nonblocking mark def handlers"
        )
    try:
        setattr(handler, MODE_ATTR, value)
    except (AttributeError, TypeError):  # a bound method or a builtin takes no attributes
        raise ServiceError(
            f"cannot mark handler {handler!r}: mark the function itself, or use serve "
            "--blocking/--nonblocking"
        ) from None
    return handler


def handler_mode(handler: object) -> bool | None:
    """True: marked blocking; False: marked nonblocking; None: not marked (watched)."""
    mode = getattr(handler, MODE_ATTR, None)
    return mode if isinstance(mode, bool) else None


def keep_mode(wrapper: H, handler: object) -> H:
    """``wrapper`` (of ``handler``: tracing, metrics) marked as ``handler`` is."""
    mode = handler_mode(handler)
    if mode is not None:
        setattr(wrapper, MODE_ATTR, mode)
    return wrapper


def check_handler(handler: object, name: str) -> None:
    """Refuse at start a handler that cannot be called as ``handler(request, ctx)``.

    Otherwise it would start fine and then fail every request. Callables whose
    signature cannot be read (some builtins, C extensions) are taken on trust.
    Raises :class:`ServiceError` naming the handler.
    """
    if handler is None:
        return
    if not callable(handler):
        raise ServiceError(f"handler {name} is {type(handler).__name__}, not a callable")
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):  # no signature to check: builtins, some C callables
        return
    try:
        sig.bind(b"", None)
    except TypeError:
        params = [
            p
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        kw_only = [
            p.name
            for p in sig.parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.default is p.empty
        ]
        if kw_only:
            what = f"needs keyword argument {kw_only[0]!r}"
        else:
            n = len(params)
            what = f"takes {n} argument{'' if n == 1 else 's'}"
        raise ServiceError(
            f"handler {name} {what}; a handler is called as handler(request, ctx)"
        ) from None


def traced(service: Service) -> Service:
    """``service`` with every request and reply logged as a hex dump (``serve --trace``).

    The wrapper keeps the handler's kind (a ``def`` stays a ``def``, so the engine
    still runs it inline; an ``async def`` stays one), and a stream session sees a
    connection whose writes are traced, so every transport and service is covered.
    """
    from dataclasses import replace

    return replace(
        service,
        handler=_traced_handler(service.handler),
        datagram=_traced_handler(service.datagram),
        stream=_traced_session(service.stream),
    )


def _traced_handler(handler: Handler | None) -> Handler | None:
    if handler is None:
        return None
    from .logs import trace

    if is_async_handler(handler):
        ahandler: AsyncHandler = handler  # type: ignore[assignment]

        async def traced_async(request: bytes, ctx: Context) -> bytes | None:
            trace(ctx.local, ctx.peer, "request from", request)
            reply = await ahandler(request, ctx)
            trace(ctx.local, ctx.peer, "reply to", reply)
            return reply

        return traced_async
    shandler: SyncHandler = handler  # type: ignore[assignment]

    def traced_sync(request: bytes, ctx: Context) -> bytes | None:
        trace(ctx.local, ctx.peer, "request from", request)
        reply = shandler(request, ctx)
        trace(ctx.local, ctx.peer, "reply to", reply)
        return reply

    return keep_mode(traced_sync, handler)  # traced, it blocks (or not) as before


class _TracedConnection:
    """A :class:`StreamConnection` whose writes are traced; everything else is the real one."""

    def __init__(self, conn: StreamConnection) -> None:
        object.__setattr__(self, "_conn", conn)

    def write(self, data: bytes) -> None:
        from .logs import trace

        conn: StreamConnection = object.__getattribute__(self, "_conn")
        trace(conn.ctx.local, conn.ctx.peer, "sent to", bytes(data))
        conn.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_conn"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_conn"), name, value)


def _traced_session(cls: type[StreamSession] | None) -> type[StreamSession] | None:
    if cls is None:
        return None
    from .logs import trace

    class Traced(cls):  # type: ignore[valid-type,misc]
        def __init__(self, conn: StreamConnection) -> None:
            super().__init__(_TracedConnection(conn))

        def on_data(self, data: bytes) -> None:
            trace(self.conn.ctx.local, self.conn.ctx.peer, "received from", bytes(data))
            super().on_data(data)

    Traced.__name__ = Traced.__qualname__ = f"Traced{cls.__name__}"
    return Traced
