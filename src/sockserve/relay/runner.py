"""``Relay``: one LISTEN endpoint joined to one TARGET, on an event loop, like ``Server``;
``RelayThread``: the same on a loop in a background thread, for sync code and tests.

A stream LISTEN is a :class:`~sockserve.server.Server` serving one binding whose service
streams with a :class:`~.session.RelaySession`: the accept loop, ``max_conns``,
``idle_timeout``, ``allow``/``deny``, TLS termination, the PROXY header on LISTEN,
connection logs and the drain on stop are the server's, not a second copy. A datagram
LISTEN (``udp://``, ``unixgram://``) is relayed by :mod:`.flows`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from typing import Any

from ..config import ServerConfig
from ..endpoints import Endpoint, parse_endpoint
from ..errors import ConfigError
from ..logs import server_log
from ..server.binding import Binding
from ..server.listeners import Listener, close_listener, open_listener
from ..server.server import Server
from ..server.thread import LoopThread
from ..service import Service
from .flows import DatagramRelay
from .pump import adopter, plain
from .session import Link, RelayStats, session_class
from .target import Origin, Target, parse_target
from .toxics import Toxic, ToxicSet

#: Keyword arguments of ``Relay`` that say how to reach the target, not how to serve.
ORIGIN_OPTIONS = frozenset(f.name for f in fields(Origin))


class Relay:
    """Join every connection (or datagram flow) on ``listen`` to ``target``.

    ``Relay("tcp://127.0.0.1:0", "unix:///run/app.sock", max_conns=100)``: ``settings`` are
    :class:`ServerConfig` fields (limits, access control, TLS termination, ``trace``) plus
    :class:`~.target.Origin`'s (``connect_timeout``, ``tls_ca``, ``server_name``,
    ``tls_client_cert``/``tls_client_key``); ``send_proxy`` (1 or 2) sends a PROXY header
    to the target first. ``toxics`` are the faults to apply (see :mod:`.toxics`).

    Error handling: a bad URL or setting raises here (EndpointError, ConfigError naming
    it); ``start`` raises what binding raises (the endpoint named), binding nothing.
    """

    def __init__(
        self,
        listen: str | Endpoint,
        target: str | Endpoint | Target,
        *,
        toxics: ToxicSet | Iterable[Toxic] = (),
        config: ServerConfig | None = None,
        send_proxy: int = 0,
        **settings: Any,
    ) -> None:
        self.listen = listen if isinstance(listen, Endpoint) else parse_endpoint(listen)
        self.target = parse_target(target)
        origin = Origin(**{k: settings.pop(k) for k in list(settings) if k in ORIGIN_OPTIONS})
        self.config = (config or ServerConfig()).replace(**settings)
        if send_proxy not in (0, 1, 2):
            raise ConfigError(f"send_proxy must be 0 (off), 1 or 2, not {send_proxy!r}")
        if self.listen.is_stream != self.target.is_stream:
            kind = "stream" if self.listen.is_stream else "datagram"
            raise ConfigError(
                f"LISTEN {self.listen} is a {kind} endpoint but TARGET {self.target} is not: "
                "relay tcp/unix/tls to tcp/unix/tls/exec:, udp/unixgram to udp/unixgram"
            )
        if not self.listen.is_stream:
            _datagram_can_honour(self.listen, self.config, send_proxy)
        self.toxics = _toxic_set(toxics, self.listen.is_stream)
        self.stats = RelayStats()
        tls_target = self.target.kind == "tls"
        self.link = Link(
            self.target,
            origin,
            self.config,
            self.stats,
            send_proxy=send_proxy,
            trace=self.config.trace,
            toxics=self.toxics,
            ssl_context=origin.ssl_context() if tls_target else None,
        )
        self.server: Server | None = None
        self._datagram: DatagramRelay | None = None
        self._datagram_listener: Listener | None = None
        self._endpoints: list[Endpoint] = []
        if self.listen.is_stream:
            service = Service(
                "relay",
                stream=session_class(self.link),
                description=f"relay to {self.target}",
                adopt=adopter(self.link) if plain(self.link) else None,  # the pump (pump.py)
            )
            binding = Binding(service, [self.listen], self.config.replace(trace=False))
            self.server = Server(binding)

    @property
    def endpoints(self) -> list[Endpoint]:
        """What it is bound to, with the real port of a port-0 URL."""
        if self.server is not None:
            return self.server.endpoints
        return self._endpoints

    @property
    def datagram(self) -> DatagramRelay | None:
        """The datagram relay of a started udp:// or unixgram:// LISTEN (its ``counts``,
        its open ``flows``), else None."""
        return self._datagram

    def url(self) -> str:
        """The URL of the bound endpoint (real port included)."""
        if not self.endpoints:
            raise LookupError(f"relay on {self.listen} is not started")
        return self.endpoints[0].url()

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()
            return
        cfg = self.config
        lst = open_listener(
            self.listen, backlog=cfg.backlog, reuse_port=cfg.reuse_port, unix_mode=cfg.unix_mode
        )
        loop = asyncio.get_running_loop()
        try:
            self._datagram = DatagramRelay(loop, lst, self.target, self.toxics, cfg, self.stats)
            self._datagram.start()
        except BaseException:
            close_listener(lst)  # bind nothing on failure, as Server.start
            self._datagram = None
            raise
        self._datagram_listener = lst
        self._endpoints = [lst.endpoint]
        server_log.info(
            "listening on %s (relay, datagram)",
            lst.endpoint,
            extra={"event": "listening", "endpoint": lst.endpoint, "service": "relay"},
        )

    async def stop(self, drain: bool = False) -> None:
        """Stop accepting and close every relayed connection (after the drain timeout with
        ``drain``, at once otherwise)."""
        if self.server is not None:
            await self.server.stop(None if drain else 0.0)
            return
        if self._datagram is not None:
            self._datagram.close()
            self._datagram = None
        if self._datagram_listener is not None:
            close_listener(self._datagram_listener)
            self._datagram_listener = None

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _datagram_can_honour(listen: Endpoint, config: ServerConfig, send_proxy: int) -> None:
    """ConfigError naming the first setting a datagram LISTEN would silently ignore: PROXY
    headers and TLS exist only on stream connections."""
    unusable = [
        ("--send-proxy" if send_proxy == 1 else "--send-proxy-v2", bool(send_proxy)),
        ("--proxy-protocol", config.proxy_protocol),
        ("--tls-cert", config.tls_cert is not None),
        ("--tls-key", config.tls_key is not None),
        ("--tls-client-ca", config.tls_client_ca is not None),
    ]
    for option, given in unusable:
        if given:
            raise ConfigError(
                f"{option} cannot apply to the datagram LISTEN {listen}: PROXY headers and TLS "
                "are for stream connections (tcp://, unix://, tls://)"
            )


def _toxic_set(toxics: ToxicSet | Iterable[Toxic], stream: bool) -> ToxicSet:
    """The relay's live ToxicSet: the one given (shared, e.g. with the API), or a new one."""
    tset = toxics if isinstance(toxics, ToxicSet) else ToxicSet(toxics)
    tset.restrict("stream" if stream else "datagram")
    return tset


class RelayThread(LoopThread):
    """A :class:`Relay` on its own event loop in a background thread.

    ``with RelayThread(listen, target, toxics=[...]) as r: r.endpoints[0].port``; takes what
    ``Relay`` takes, or a ``Relay``. Entering returns once it is bound (raising its bind
    error); leaving stops it and closes every relayed connection.
    """

    what = "relay"

    def __init__(
        self,
        listen: str | Endpoint | Relay,
        target: str | Endpoint | Target | None = None,
        *,
        loop_kind: str = "auto",
        start_timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        if isinstance(listen, Relay):
            self.relay = listen
        else:
            if target is None:
                raise ConfigError("RelayThread: give LISTEN and TARGET, or a Relay")
            self.relay = Relay(listen, target, **kwargs)
        super().__init__(loop_kind, start_timeout)
        self._stop: asyncio.Event | None = None

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.relay.endpoints

    @property
    def stats(self) -> RelayStats:
        return self.relay.stats

    @property
    def toxics(self) -> ToxicSet:
        return self.relay.toxics

    def url(self) -> str:
        return self.relay.url()

    def call(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the relay's loop (from the test's or the caller's thread)."""
        assert self._loop is not None, "RelayThread is not started"
        self._loop.call_soon_threadsafe(fn, *args)

    async def _open(self) -> None:
        self._stop = asyncio.Event()
        await self.relay.start()

    async def _serve(self) -> None:
        assert self._stop is not None
        try:
            await self._stop.wait()
        finally:
            await self.relay.stop()

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()


def metrics_page(relays: list[Relay]) -> Callable[[], bytes]:
    """The Prometheus page of ``relays`` (``relay --metrics``), read when scraped.

    Series, labelled ``listen`` and ``target``: ``sockserve_relay_connections_total``,
    ``sockserve_relay_open_connections``, ``sockserve_relay_bytes_total`` (``direction``
    upstream: client to target, downstream: back), ``sockserve_relay_errors_total``
    (``kind``: connect, client_reset, target_reset) and
    ``sockserve_relay_toxics_applied_total`` (``type``); for a datagram LISTEN also
    ``sockserve_relay_datagrams_total`` (``direction``), ``sockserve_relay_datagrams_dropped_total``,
    ``sockserve_relay_datagrams_refused_total`` (ECONNREFUSED from the target) and
    ``sockserve_relay_open_flows``.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self) -> Iterator[Any]:
            labels = ["listen", "target"]
            conns = CounterMetricFamily(
                "sockserve_relay_connections", "Connections relayed", labels=labels
            )
            opened = GaugeMetricFamily(
                "sockserve_relay_open_connections", "Relayed now", labels=labels
            )
            moved = CounterMetricFamily(
                "sockserve_relay_bytes", "Bytes relayed", labels=[*labels, "direction"]
            )
            errors = CounterMetricFamily(
                "sockserve_relay_errors", "Failures", labels=[*labels, "kind"]
            )
            toxics = CounterMetricFamily(
                "sockserve_relay_toxics_applied", "Toxics applied", labels=[*labels, "type"]
            )
            grams = CounterMetricFamily(
                "sockserve_relay_datagrams", "Datagrams relayed", labels=[*labels, "direction"]
            )
            dropped = CounterMetricFamily(
                "sockserve_relay_datagrams_dropped", "Datagrams not relayed", labels=labels
            )
            refused = CounterMetricFamily(
                "sockserve_relay_datagrams_refused", "Refused by the target", labels=labels
            )
            flows = GaugeMetricFamily("sockserve_relay_open_flows", "Flows open", labels=labels)
            for r in relays:
                key = [r.endpoints[0].url() if r.endpoints else str(r.listen), str(r.target)]
                st = r.stats
                conns.add_metric(key, st.connections)
                opened.add_metric(key, st.open)
                moved.add_metric([*key, "upstream"], st.bytes_up)
                moved.add_metric([*key, "downstream"], st.bytes_down)
                for kind, n in sorted(st.errors.items()):
                    errors.add_metric([*key, kind], n)
                for kind, n in sorted(st.toxics.items()):
                    toxics.add_metric([*key, kind], n)
                if (dgram := r.datagram) is not None:
                    counts = dgram.counts
                    grams.add_metric([*key, "upstream"], counts.datagrams_up)
                    grams.add_metric([*key, "downstream"], counts.datagrams_down)
                    dropped.add_metric(key, counts.dropped)
                    refused.add_metric(key, counts.refused)
                    flows.add_metric(key, len(dgram.flows))
            yield from (conns, opened, moved, errors, toxics, grams, dropped, refused, flows)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    return lambda: generate_latest(registry)


__all__ = ["ORIGIN_OPTIONS", "Relay", "RelayStats", "RelayThread", "metrics_page"]
