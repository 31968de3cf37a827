"""The ``/metrics`` HTTP endpoint (``--metrics HOST:PORT``): h11 on an event loop.

It serves whatever page ``render`` returns and knows nothing of what is counted:
:mod:`.metrics` counts, snapshots and renders the Prometheus page, and builds
this endpoint around it (:func:`~sockserve.deploy.metrics.registry_for`,
:class:`~sockserve.deploy.metrics.MetricsThread`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, cast

from ..logs import server_log


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
    :meth:`start` logs the URL, with ``scope`` (what one scrape covers) after it.
    """

    def __init__(
        self,
        sock: socket.socket,
        render: Callable[[], bytes],
        *,
        blocking: bool = False,
        max_conns: int = MAX_SCRAPE_CONNS,
        read_timeout: float = SCRAPE_READ_TIMEOUT,
        scope: str | None = None,
    ) -> None:
        self.sock = sock
        self.scope = scope
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

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        if self.blocking:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sockserve-metrics")
        self._server = await loop.create_server(
            lambda: _ScrapeProtocol(self), sock=self.sock, backlog=SCRAPE_BACKLOG
        )
        scope = f" ({self.scope})" if self.scope else ""
        server_log.info("metrics on %s%s", self.url, scope, extra={"event": "metrics"})

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
