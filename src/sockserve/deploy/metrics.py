"""Prometheus metrics (``--metrics HOST:PORT``): counted in plain integers, read at scrape time.

Cost model: with metrics off nothing here runs; the engine's hot path is
untouched. With metrics on, each service handler is wrapped once per
(service, transport) by :func:`meter`, which adds two clock reads, a few integer
additions and a bisect per request: no prometheus_client call per request.
Open connections and errors by kind are read from the runtimes (``len(conns)``,
``errors``, ``dropped``) only when ``/metrics`` is scraped, by a custom collector.

Across ``--workers`` each worker answers a snapshot request over a socketpair
and the supervisor sums them (plus the last snapshot of workers that died, so
counters never go backwards), so one scrape covers every worker.

Series: ``sockserve_requests_total``, ``sockserve_request_duration_seconds``
(histogram), ``sockserve_connections`` (open now), ``sockserve_received_bytes_total``,
``sockserve_sent_bytes_total`` (request and reply payloads), all labelled
``service`` and ``transport``; ``sockserve_errors_total`` adds ``kind``.

The HTTP side (parsing ``--metrics``, binding it, answering scrapes) is
:mod:`.scrape`, which serves any page it is given; this module hands it the
Prometheus page (:func:`registry_for`) and re-exports it, so ``deploy.metrics``
is the one name the app, the supervisor and the CLI import metrics from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from ..service import Context, Handler, Service, is_async_handler, keep_mode
from .scrape import MetricsServer, open_metrics_socket, parse_listen

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ..server.binding import Binding
    from ..server.server import Server

#: Upper bounds (seconds) of the duration buckets: 100 µs (a loopback echo) up to 10 s.
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

Snapshot = list[dict[str, Any]]


class Stats:
    """Counters of one (service, transport), bumped by the metered handler."""

    __slots__ = ("buckets", "bytes_in", "bytes_out", "duration", "errors", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.duration = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)  # the last is +Inf
        self.errors: dict[str, int] = {}


def meter(service: Service, stats: Stats) -> Service:
    """The same service with its handlers counted and timed into ``stats``."""
    changes: dict[str, Any] = {}
    if service.handler is not None:
        changes["handler"] = _metered(service.handler, stats)
    if service.datagram is not None:
        changes["datagram"] = _metered(service.datagram, stats)
    return dataclasses.replace(service, **changes) if changes else service


def _metered(handler: Handler, st: Stats) -> Handler:
    clock = time.perf_counter
    bounds = BUCKETS

    def record(request: bytes, reply: object, elapsed: float) -> None:
        st.requests += 1
        st.bytes_in += len(request)
        if isinstance(reply, (bytes, bytearray, memoryview)):
            st.bytes_out += len(reply)
        st.duration += elapsed
        st.buckets[bisect_left(bounds, elapsed)] += 1

    def failed() -> None:
        st.errors["handler"] = st.errors.get("handler", 0) + 1

    if is_async_handler(handler):
        async_handler = cast(Callable[[bytes, Context], Awaitable[Any]], handler)

        async def metered_async(request: bytes, ctx: Context) -> Any:
            start = clock()
            try:
                reply = await async_handler(request, ctx)
            except Exception:
                failed()
                raise
            record(request, reply, clock() - start)
            return reply

        return metered_async

    def metered(request: bytes, ctx: Context) -> Any:
        start = clock()
        try:
            reply = handler(request, ctx)
        except Exception:
            failed()
            raise
        record(request, reply, clock() - start)
        return reply

    return keep_mode(metered, handler)  # metered, it blocks (or not) as before


class MetricsState:
    """Per-process registry of :class:`Stats`, and the snapshot of a running server."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], Stats] = {}
        #: Error counts of runtimes removed by a reload, so counters never go backwards.
        self.retired: dict[tuple[str, str], dict[str, int]] = {}

    def instrument(self, binding: Binding) -> Binding:
        """Meter a binding whose endpoints share one transport (one per binding when reloading)."""
        schemes = {ep.scheme for ep in binding.endpoints}
        if len(schemes) != 1:
            raise ValueError("instrument one transport per binding")
        key = (binding.service.name, schemes.pop())
        stats = self.stats.setdefault(key, Stats())
        return dataclasses.replace(binding, service=meter(binding.service, stats))

    def retire(self, runtimes: Iterable[Any]) -> None:
        for rt in runtimes:
            errors = self.retired.setdefault((rt.service.name, rt.endpoint.scheme), {})
            for kind, n in _runtime_errors(rt).items():
                errors[kind] = errors.get(kind, 0) + n

    def snapshot(self, server: Server) -> Snapshot:
        """Current values as plain data (JSON-able: it crosses a pipe from workers)."""
        series: dict[tuple[str, str], dict[str, Any]] = {}

        def entry(key: tuple[str, str]) -> dict[str, Any]:
            if key not in series:
                series[key] = _empty(*key)
            return series[key]

        for key, st in list(self.stats.items()):
            e = entry(key)
            e.update(
                requests=st.requests,
                bytes_in=st.bytes_in,
                bytes_out=st.bytes_out,
                duration=st.duration,
                buckets=list(st.buckets),
            )
            _add_errors(e, dict(st.errors))
        for key, errors in list(self.retired.items()):
            _add_errors(entry(key), dict(errors))
        runtimes: list[Any] = [*server.streams, *server.datagrams]
        for rt in runtimes:
            e = entry((rt.service.name, rt.endpoint.scheme))
            e["connections"] += len(getattr(rt, "conns", ()))
            _add_errors(e, _runtime_errors(rt))
        return list(series.values())


def _runtime_errors(rt: Any) -> dict[str, int]:
    errors = dict(getattr(rt, "errors", {}))
    dropped = getattr(rt, "dropped", 0)
    if dropped:
        errors["udp_dropped"] = dropped
    return errors


def _empty(service: str, transport: str) -> dict[str, Any]:
    return {
        "service": service,
        "transport": transport,
        "requests": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "duration": 0.0,
        "buckets": [0] * (len(BUCKETS) + 1),
        "errors": {},
        "connections": 0,
    }


def _add_errors(entry: dict[str, Any], errors: dict[str, int]) -> None:
    mine = entry["errors"]
    for kind, n in errors.items():
        mine[kind] = mine.get(kind, 0) + n


def merge(*snapshots: Snapshot) -> Snapshot:
    """Sum snapshots (of several workers) series by series."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for snap in snapshots:
        for s in snap:
            key = (s["service"], s["transport"])
            e = out.setdefault(key, _empty(*key))
            for field in ("requests", "bytes_in", "bytes_out", "duration", "connections"):
                e[field] += s[field]
            e["buckets"] = [a + b for a, b in zip(e["buckets"], s["buckets"], strict=True)]
            _add_errors(e, s["errors"])
    return list(out.values())


def without_gauges(snapshot: Snapshot) -> Snapshot:
    """A dead worker's last snapshot: its counters still count, its connections do not."""
    return [{**s, "connections": 0} for s in snapshot]


class SockserveCollector:
    """A prometheus_client collector that reads a snapshot when scraped."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        labels = ["service", "transport"]
        snap = self._source()
        requests = CounterMetricFamily("sockserve_requests", "Requests answered", labels=labels)
        received = CounterMetricFamily(
            "sockserve_received_bytes", "Request payload bytes received", labels=labels
        )
        sent = CounterMetricFamily(
            "sockserve_sent_bytes", "Reply payload bytes sent", labels=labels
        )
        conns = GaugeMetricFamily(
            "sockserve_connections", "Stream connections open now", labels=labels
        )
        errors = CounterMetricFamily(
            "sockserve_errors", "Failures by kind", labels=[*labels, "kind"]
        )
        duration = HistogramMetricFamily(
            "sockserve_request_duration_seconds", "Time in the service handler", labels=labels
        )
        for s in snap:
            values = [s["service"], s["transport"]]
            requests.add_metric(values, s["requests"])
            received.add_metric(values, s["bytes_in"])
            sent.add_metric(values, s["bytes_out"])
            conns.add_metric(values, s["connections"])
            for kind, n in sorted(s["errors"].items()):
                errors.add_metric([*values, kind], n)
            cumulative, buckets = 0, []
            for bound, n in zip((*BUCKETS, float("inf")), s["buckets"], strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            duration.add_metric(values, buckets, sum_value=s["duration"])
        yield from (requests, received, sent, conns, errors, duration)


def registry_for(source: Callable[[], Snapshot]) -> Callable[[], bytes]:
    """A renderer of the Prometheus text page for ``source`` (prometheus_client's own writer)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SockserveCollector(source))
    return lambda: generate_latest(registry)


class MetricsThread:
    """A :class:`MetricsServer` on its own event loop in one thread (the supervisor has none)."""

    def __init__(self, address: str, source: Callable[[], Snapshot], **options: Any) -> None:
        sock = open_metrics_socket(address)
        self.http = MetricsServer(sock, registry_for(source), blocking=True, **options)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="sockserve-metrics", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.http.start())
            self._ready.set()
            loop.run_forever()
            self.http.close()
            loop.run_until_complete(asyncio.sleep(0))
        finally:
            self._ready.set()
            loop.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


__all__ = [
    "BUCKETS",
    "MetricsServer",
    "MetricsState",
    "MetricsThread",
    "Snapshot",
    "SockserveCollector",
    "Stats",
    "merge",
    "meter",
    "open_metrics_socket",
    "parse_listen",
    "registry_for",
    "without_gauges",
]
