"""Turning a binding into running parts, and winding them down: what :class:`Server` does
per endpoint, apart from the server so that it reads as a lifecycle.

A binding's endpoints each get a listener (opened here, or handed in by systemd, the
supervisor or a reload) and a runtime: :class:`StreamRuntime` for stream endpoints,
:class:`DatagramRuntime` for datagram ones. Winding down is either a drain (stop, let
in-flight requests finish up to a deadline, abort the rest) or a retirement (a reload
replaced the binding: its connections are served until they end by themselves).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from .._engine.contracts import RuntimeHost
from .._engine.datagram import DatagramRuntime
from .._engine.proxywrap import warn_settings
from .._engine.runtime import StreamRuntime
from ..endpoints import Endpoint
from ..errors import ConfigError
from ..logs import server_log
from .binding import Binding
from .listeners import Listener, open_listener
from .tls import server_context
from .tlsconn import TlsStream

Runtime = StreamRuntime | DatagramRuntime
#: What serving one endpoint of a binding is made of: the endpoint as configured, its
#: runtime and its listener (whose endpoint has the real port).
Part = tuple[Endpoint, Runtime, Listener]

#: How often a partial drain (a binding removed on reload) checks for its last connection.
_DRAIN_POLL = 0.05
#: How often idle connections are looked for: a quarter of the timeout, within [0.05 s, 1 s].
_SWEEP_MIN, _SWEEP_MAX = 0.05, 1.0


def open_binding(host: RuntimeHost, binding: Binding, parts: list[Part]) -> None:
    """Open a listener and make a runtime for each endpoint of ``binding``, appending each
    part to ``parts`` as soon as it exists (so a caller whose binding fails half-way knows
    which sockets to close), and log a "listening on" line for each.

    Error handling: a service that cannot serve an endpoint's kind raises ConfigError, a
    bad certificate TLSFileError, a socket that cannot be bound EndpointError.
    """
    cfg = binding.config
    svc = binding.service
    ssl_ctx = None
    for ep in binding.endpoints:
        if ep.scheme == "tls" and ssl_ctx is None:
            ssl_ctx = binding.ssl_context or server_context(
                cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca
            )
            binding.ssl_context = ssl_ctx
        if ep.is_stream and svc.handler is None and svc.stream is None:
            raise ConfigError(f"service {svc.name} cannot serve stream endpoint {ep}")
        if not ep.is_stream and svc.datagram_handler() is None:
            raise ConfigError(f"service {svc.name} cannot serve datagram endpoint {ep}")
        lst = binding.listeners.get(ep) or open_listener(
            ep, backlog=cfg.backlog, reuse_port=cfg.reuse_port, unix_mode=cfg.unix_mode
        )
        runtime: Runtime
        if ep.is_stream:
            tls = ssl_ctx if ep.scheme == "tls" else None
            runtime = StreamRuntime(host, lst, svc, cfg, tls, TlsStream)
        else:
            runtime = DatagramRuntime(host, lst, svc, cfg)
        parts.append((ep, runtime, lst))
        mode = (
            cfg.framing
            if ep.is_stream and svc.stream is None
            else ("stream" if ep.is_stream else "datagram")
        )
        server_log.info(
            "listening on %s (%s, %s)",
            lst.endpoint,
            svc.name,
            mode,
            extra={
                "event": "listening",
                "endpoint": lst.endpoint,
                "service": svc.name,
                "framing": mode,
            },
        )
        warn_settings(lst.endpoint, cfg)
        if ep.is_stream and svc.stream is not None and cfg.framing != "raw":
            server_log.warning(
                "%s: %s is a byte stream and ignores framing %r; remove the setting",
                lst.endpoint,
                svc.name,
                cfg.framing,
                extra={"event": "framing_ignored", "endpoint": lst.endpoint},
            )


def split(runtimes: Iterable[Runtime]) -> tuple[list[StreamRuntime], list[DatagramRuntime]]:
    streams = [rt for rt in runtimes if isinstance(rt, StreamRuntime)]
    datagrams = [rt for rt in runtimes if isinstance(rt, DatagramRuntime)]
    return streams, datagrams


def abort(streams: Iterable[StreamRuntime], datagrams: Iterable[DatagramRuntime]) -> None:
    """Close every connection now and cancel every async datagram reply still running."""
    for srt in streams:
        srt.abort_all()
    for drt in datagrams:
        for task in list(drt.inflight):
            task.cancel()


def _busy(streams: Sequence[StreamRuntime], datagrams: Sequence[DatagramRuntime]) -> bool:
    return any(s.conns or s.pending for s in streams) or any(d.inflight for d in datagrams)


async def wait_retired(runtimes: Iterable[Runtime]) -> None:
    """Wait for the last connection (or async datagram reply) of replaced runtimes."""
    streams, datagrams = split(runtimes)
    while _busy(streams, datagrams):
        await asyncio.sleep(_DRAIN_POLL * 4)


async def drain(
    loop: asyncio.AbstractEventLoop, runtimes: Iterable[Runtime], timeout: float
) -> None:
    """Let the runtimes' in-flight requests finish for up to ``timeout`` s, then abort the rest."""
    streams, datagrams = split(runtimes)
    for srt in streams:
        srt.drain()
    deadline = loop.time() + timeout
    while _busy(streams, datagrams):
        if loop.time() >= deadline:
            abort(streams, datagrams)
            break
        await asyncio.sleep(_DRAIN_POLL)
    await asyncio.sleep(0)  # let connection_lost of aborted transports run


class IdleSweeper:
    """Closes the connections idle past their endpoint's ``idle_timeout``: one timer for
    every runtime (``streams`` is the server's live list), as often as the shortest timeout
    needs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, streams: list[StreamRuntime]) -> None:
        self._loop = loop
        self._streams = streams
        self._timer: asyncio.TimerHandle | None = None
        self._period = _SWEEP_MAX

    def schedule(self) -> None:
        """Start sweeping, or sweep more often if a runtime added since wants it."""
        timeouts = [rt.config.idle_timeout for rt in self._streams if rt.config.idle_timeout]
        if not timeouts:
            return
        period = min(_SWEEP_MAX, max(_SWEEP_MIN, min(timeouts) / 4))
        if self._timer is not None:
            if self._period <= period:
                return  # already sweeping often enough
            self._timer.cancel()
        self._period = period
        self._timer = self._loop.call_later(period, self._sweep, period)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _sweep(self, period: float) -> None:
        now = self._loop.time()
        for rt in self._streams:
            if rt.config.idle_timeout:
                rt.sweep_idle(now, rt.config.idle_timeout)
        self._timer = self._loop.call_later(period, self._sweep, period)
