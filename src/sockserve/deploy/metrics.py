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
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from ..service import Context, Handler, Service, is_async_handler

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ..server.server import Binding, Server

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

    return metered


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


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9100`` for IPv6) for ``--metrics``."""
    from ..errors import ConfigError

    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9100")
    return host, int(port)


#: Scrape connections served at once; more are answered 503 and closed (a scraper needs one).
MAX_SCRAPE_CONNS = 64
#: Seconds a scrape connection may take to send a whole request (idle or slow clients).
SCRAPE_READ_TIMEOUT = 10.0
#: Listen queue of the metrics socket: a burst of scrapers waits instead of being refused.
SCRAPE_BACKLOG = 128
#: Largest request head accepted (h11's limit on an incomplete event): 431 past it.
MAX_REQUEST_HEAD = 16 * 1024
#: Unsent response bytes beyond which a connection that does not read is dropped.
MAX_UNSENT = 4 * 1024 * 1024


def open_metrics_socket(address: str) -> socket.socket:
    """Bind ``HOST:PORT`` for ``--metrics`` now, so a taken port is reported at start.

    Error handling: a port that cannot be bound raises :class:`EndpointError` naming it.
    """
    from ..errors import EndpointError

    host, port = parse_listen(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise EndpointError(
            f"metrics http://{address}/metrics: cannot bind: {exc.strerror or exc}"
        ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(SCRAPE_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise EndpointError(
            f"metrics http://{address}/metrics: cannot bind: {exc.strerror or exc}"
        ) from None
    return sock


class MetricsServer:
    """``/metrics`` over HTTP/1.1 (h11) on an event loop: no thread per connection.

    Resource handling: at most ``max_conns`` scrape connections at once (more get 503
    and are closed), each closed if it has not sent a whole request within
    ``read_timeout`` (idle keep-alive and slow clients alike), a request head is
    capped at :data:`MAX_REQUEST_HEAD`, and a client that does not read its
    responses is dropped past :data:`MAX_UNSENT`. Error handling: bytes that are not
    HTTP get a 400 (or h11's hint, e.g. 431) and the connection is closed; other
    paths get 404, methods other than GET/HEAD 405.

    ``render`` builds the body; with ``blocking=True`` (the supervisor, which asks its
    workers) it runs in one helper thread so the loop keeps serving meanwhile.
    """

    def __init__(
        self,
        sock: socket.socket,
        render: Callable[[], bytes],
        *,
        blocking: bool = False,
        max_conns: int = MAX_SCRAPE_CONNS,
        read_timeout: float = SCRAPE_READ_TIMEOUT,
    ) -> None:
        self.sock = sock
        self.render = render
        self.blocking = blocking
        self.max_conns = max_conns
        self.read_timeout = read_timeout
        self.active = 0
        self._server: asyncio.AbstractServer | None = None
        self._executor: Any = None
        self._conns: set[_ScrapeProtocol] = set()

    @property
    def address(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return str(name[0]), int(name[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        if self.blocking:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sockserve-metrics")
        self._server = await loop.create_server(
            lambda: _ScrapeProtocol(self), sock=self.sock, backlog=SCRAPE_BACKLOG
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]


def _reason(status: int) -> bytes:
    from http import HTTPStatus

    return HTTPStatus(status).phrase.encode()


class _ScrapeProtocol(asyncio.Protocol):
    """One scrape connection: requests parsed by h11, answered one at a time, in order."""

    def __init__(self, server: MetricsServer) -> None:
        import h11

        self.h11 = h11
        self.server = server
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.request: tuple[bytes, bytes] | None = None
        self.busy = False  # a body is being rendered
        self.paused = False  # the client is not reading
        self.counted = False
        self.since = 0.0  # when it last started waiting for a request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        srv = self.server
        if srv.active >= srv.max_conns:
            # Full: make room by closing the connection that has waited longest for a
            # request, so idle or slow clients cannot lock real scrapers out.
            idle = [c for c in srv._conns if not c.busy]
            if idle:
                min(idle, key=lambda c: c.since).abort()
        if srv.active >= srv.max_conns:
            body = b"too many scrape connections\n"
            self.transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n"
                b"content-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            self.transport.close()
            return
        srv.active += 1
        self.counted = True
        srv._conns.add(self)
        self.transport.set_write_buffer_limits(MAX_UNSENT // 4)
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.since = self.server.loop.time()
        self.timer = self.server.loop.call_later(self.server.read_timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._process()
        return True  # close ourselves once a pending response is written

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None:
            if self.transport.get_write_buffer_size() > MAX_UNSENT:
                self.abort()
                return
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.counted:
            self.counted = False
            self.server.active -= 1
            self.server._conns.discard(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(None)  # frees the slot now; the transport's own call is a no-op

    def _process(self) -> None:
        h11 = self.h11
        while not self.busy and not self.paused:
            if self.transport is None or self.transport.is_closing():
                return
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc.error_status_hint)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = (event.method, event.target)
            elif isinstance(event, h11.EndOfMessage):
                assert self.request is not None
                self._answer(*self.request)
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return
            # Data (a request body): read and ignored.

    def _answer(self, method: bytes, target: bytes) -> None:
        if method not in (b"GET", b"HEAD"):
            self._respond(405, b"method not allowed: use GET\n", [(b"allow", b"GET, HEAD")])
        elif target.split(b"?", 1)[0] != b"/metrics":
            self._respond(404, b"not found: metrics are at /metrics\n")
        elif self.server.blocking:
            self.busy = True
            fut = self.server.loop.run_in_executor(self.server._executor, self.server.render)
            fut.add_done_callback(self._rendered)
        else:
            self._respond_metrics(self.server.render)

    def _rendered(self, fut: asyncio.Future[bytes]) -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self._respond_metrics(fut.result)
        self._process()

    def _respond_metrics(self, render: Callable[[], bytes]) -> None:
        try:
            body = render()
        except Exception:
            from ..logs import server_log

            server_log.exception("metrics: rendering /metrics failed")
            self._respond(500, b"rendering metrics failed; see the server log\n")
            return
        from prometheus_client import CONTENT_TYPE_LATEST

        self._respond(200, body, content_type=CONTENT_TYPE_LATEST.encode())

    def _respond(
        self,
        status: int,
        body: bytes,
        extra: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes | None = None,
    ) -> None:
        h11 = self.h11
        assert self.transport is not None and self.request is not None
        head = self.request[0] == b"HEAD"
        headers = [
            (b"content-type", content_type) if content_type else _TEXT[0],
            (b"content-length", str(len(body)).encode()),
            *(extra or []),
        ]
        out = self.conn.send(
            h11.Response(status_code=status, headers=headers, reason=_reason(status))
        )
        if not head:
            out += self.conn.send(h11.Data(data=body))
        out += self.conn.send(h11.EndOfMessage())
        self.transport.write(out)
        self.request = None
        if self.conn.our_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        self.conn.start_next_cycle()
        self._arm()

    def _bad_request(self, status: int) -> None:
        h11 = self.h11
        assert self.transport is not None
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = b"bad request\n"
            try:
                out = self.conn.send(
                    h11.Response(
                        status_code=status,
                        reason=_reason(status),
                        headers=[
                            *_TEXT,
                            (b"content-length", b"%d" % len(body)),
                            (b"connection", b"close"),
                        ],
                    )
                )
                out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
                self.transport.write(out)
            except h11.LocalProtocolError:
                pass
        self.transport.close()


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
