"""Toxiproxy's HTTP API (``sockserve relay --api 127.0.0.1:8474``), h11 on the event loop.

Routes, bodies and status codes are Toxiproxy 2.12.0's (``api.go``), so its clients
(``toxiproxy-python``, ``toxiproxy-node-client``...) drive sockserve unchanged. The proxies
are :mod:`.proxies`, the routes :mod:`.routes`; this module is only HTTP.

Resource handling: at most :data:`MAX_API_CONNS` connections (the one idle longest makes
room); each must send a whole request within :data:`READ_TIMEOUT`; heads are capped at
:data:`MAX_REQUEST_HEAD`, bodies at :data:`MAX_BODY` (413). A slow or hostile client costs
one connection, never the loop the relays run on. Error handling: bytes that are not HTTP
get 400 (or h11's hint) and a close; other errors are Toxiproxy's ``{"error", "status"}``.
As Toxiproxy, a ``User-Agent`` of ``Mozilla/...`` gets 403: no web page drives the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from http import HTTPStatus
from typing import Any, cast

import h11

from .. import __version__
from ..endpoints import Endpoint, parse_endpoint
from ..errors import ConfigError, EndpointError
from ..logs import server_log
from ..server.loop import log_loop_exception, new_event_loop
from .proxies import ApiError, Proxies
from .routes import ROUTES, TOXIPROXY_VERSION, Raw, parse_path, route

#: Toxiproxy's own port, the default of ``--api`` and of every client.
DEFAULT_PORT = 8474
#: API connections at once; a test suite needs a few, so 64 is generous.
MAX_API_CONNS = 64
#: Seconds to send a whole request (Toxiproxy's ``ReadTimeout`` is 15 s too).
READ_TIMEOUT = 15.0
#: Largest request head (h11's cap on an incomplete event): 431 past it.
MAX_REQUEST_HEAD = 16 * 1024
#: Largest request body: a populate of thousands of proxies fits; 413 past it.
MAX_BODY = 1024 * 1024
SERVER_HEADER = f"sockserve/{__version__} (toxiproxy api {TOXIPROXY_VERSION})".encode()


def api_endpoint(text: str) -> Endpoint:
    """``--api``: ``HOST:PORT`` (Toxiproxy's ``-host``/``-port``) or ``tcp://HOST:PORT``."""
    url = text if "://" in text else f"tcp://{text}"
    try:
        endpoint = parse_endpoint(url, default_port=DEFAULT_PORT)
    except EndpointError as exc:
        raise ConfigError(f"--api {text!r}: {exc}") from None
    if endpoint.scheme != "tcp":
        raise ConfigError(f"--api {text!r}: the API is HTTP over TCP (tcp://HOST:PORT)")
    return endpoint


async def serve_api(endpoint: Endpoint, proxies: Proxies) -> ApiServer:
    """Serve the API for ``proxies`` on ``endpoint`` (port 0 allowed); EndpointError if not."""
    server = ApiServer(endpoint, proxies)
    await server.start()
    return server


class ApiServer:
    """The API's listener and connections. :attr:`endpoint` has the real port once started."""

    def __init__(self, endpoint: Endpoint, proxies: Proxies) -> None:
        self.endpoint = endpoint
        self.proxies = proxies
        self.conns: set[_ApiProtocol] = set()
        self.read_timeout = READ_TIMEOUT
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        ep = self.endpoint
        return f"http://[{ep.host}]:{ep.port}" if ep.is_ipv6 else f"http://{ep.host}:{ep.port}"

    async def start(self) -> None:
        loop = self.loop = asyncio.get_running_loop()
        ep = self.endpoint
        host = None if ep.is_dualstack else ep.host
        try:
            self._server = await loop.create_server(
                lambda: _ApiProtocol(self), host, ep.port, reuse_address=True
            )
            self.endpoint = ep.with_port(int(self._server.sockets[0].getsockname()[1]))
        except OSError as exc:
            raise EndpointError(f"api {ep}: cannot bind: {exc.strerror or exc}") from None
        server_log.info("toxiproxy api on %s", self.url, extra={"event": "api"})

    async def close(self) -> None:
        """Stop listening and drop every API connection (the proxies are the caller's)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self.conns):
            conn.abort()
        if server is not None:
            await server.wait_closed()


class ApiThread:
    """The API and its :class:`Proxies` on an event loop in a background thread.

    ``with ApiThread() as api:`` serves on ``127.0.0.1:0`` (or ``listen``); point a Toxiproxy
    client at ``api.url``. Leaving stops the API and every proxy; ``settings``: each relay's.
    """

    def __init__(self, listen: str | Endpoint = "127.0.0.1:0", **settings: Any) -> None:
        self.endpoint = listen if isinstance(listen, Endpoint) else api_endpoint(listen)
        self.proxies = Proxies(**settings)
        self.server: ApiServer | None = None
        self.loop = new_event_loop()
        self.loop.set_exception_handler(log_loop_exception)
        self._thread = threading.Thread(target=self.loop.run_forever, name="sockserve-api")

    @property
    def url(self) -> str:
        assert self.server is not None, "ApiThread is not started"
        return self.server.url

    def start(self, timeout: float = 10.0) -> ApiThread:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            serve_api(self.endpoint, self.proxies), self.loop
        )
        try:
            self.server = started.result(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    async def _close(self) -> None:
        if self.server is not None:
            await self.server.close()
        await self.proxies.close()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> ApiThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class _ApiProtocol(asyncio.Protocol):
    """One API connection: requests parsed by h11 and answered one at a time, in order."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.paused = False  # the client is not reading
        self.lingering = False  # answered and half-closed: what still comes is dropped
        self.since = 0.0  # when it last started waiting for a request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        conns = self.server.conns
        if len(conns) >= MAX_API_CONNS:
            # Full: the connection that has waited longest for a request makes room, so
            # idle or slow clients cannot lock real ones out.
            idle = [c for c in conns if c.task is None]
            if idle:
                min(idle, key=lambda c: c.since).abort()
        if len(conns) >= MAX_API_CONNS:
            self.transport.abort()
            return
        conns.add(self)
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = self.server.loop
        self.since = loop.time()
        self.timer = loop.call_later(self.server.read_timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        if not self.lingering:
            self.conn.receive_data(data)
            self._process()

    def eof_received(self) -> bool:
        if not self.lingering:
            self.conn.receive_data(b"")
            self._process()
        return not self.lingering  # else close ourselves once a pending response is written

    def pause_writing(self) -> None:
        # No more requests are read or answered until the client reads what it was sent,
        # so one that pipelines without reading holds at most one response here.
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.server.conns.discard(self)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(None)  # frees the slot now; the transport's own call is a no-op

    def _process(self) -> None:
        while self.task is None and not self.paused:
            if self.transport is None or self.transport.is_closing():
                return
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, f"bad request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.body.clear()
                length = dict(event.headers).get(b"content-length", b"0")
                if int(length) > MAX_BODY:  # h11 has checked it is digits
                    self._fail(413, f"request body over {MAX_BODY} bytes")
                    return
                if self.conn.they_are_waiting_for_100_continue:  # curl, for bodies over 1 KiB
                    go_on = h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue"
                    )
                    self.transport.write(self.conn.send(go_on) or b"")
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > MAX_BODY:  # chunked bodies have no length up front
                    self._fail(413, f"request body over {MAX_BODY} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage):
                if self.timer is not None:
                    self.timer.cancel()  # the time we take is not the client's
                self.task = self.server.loop.create_task(self._handle())
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    async def _handle(self) -> None:
        assert self.request is not None
        request, body = self.request, bytes(self.body)
        what = (request.method + b" " + request.target).decode("ascii", "replace")
        try:
            status, payload = await route(self.server.proxies, request, body)
        except ApiError as exc:
            status, payload = exc.status, exc.to_json()
        except Exception as exc:
            server_log.exception("api: %s failed", what)
            status, payload = 500, {"error": f"internal error: {exc}", "status": 500}
        if request.method != b"GET" or status >= 400:
            server_log.info("api: %s: %d", what, status, extra={"event": "api"})
        self.task = None
        if self.transport is None or self.transport.is_closing():
            return
        self._respond(status, payload)
        self._process()

    def _respond(self, status: int, payload: Any) -> None:
        """Toxiproxy's shapes: compact JSON; errors end in a newline, as Go's ``http.Error``."""
        assert self.transport is not None
        headers = [(b"server", SERVER_HEADER)]
        if isinstance(payload, Raw):
            body = payload.body
            headers.append((b"content-type", payload.content_type))
        elif payload is not None:
            body = _json(payload) + (b"\n" if status >= 400 else b"")
            headers.append((b"content-type", b"application/json"))
        else:
            body = b""
        if status == 405:
            allowed = ROUTES.get(parse_path(self.request.target)[1], ()) if self.request else ()
            headers.append((b"allow", ", ".join(allowed).encode()))
        if status != 204:
            headers.append((b"content-length", b"%d" % len(body)))
        reason = HTTPStatus(status).phrase.encode()
        out = self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
        out = out or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        self.transport.write(out + (self.conn.send(h11.EndOfMessage()) or b""))
        self.request = None
        if self.conn.our_state is h11.MUST_CLOSE:
            self._linger()
            return
        self.conn.start_next_cycle()
        self._arm()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request we cannot go on with, then close: its bytes cannot be trusted."""
        assert self.transport is not None
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                self._respond(status, {"error": message, "status": status})
        self._linger()

    def _linger(self) -> None:
        """Half-close, drop what still comes until the client's EOF or a second, then close:
        a close with input unread resets the connection, and the client loses the answer."""
        t = self.transport
        if t is None or t.is_closing() or self.lingering:
            return
        self.lingering = True
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.server.loop.call_later(1.0, t.close)
