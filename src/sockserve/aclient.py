"""The asyncio client: ``async with aconnect(url) as c: reply = await c.request(b"hi")``.

Same endpoints, framings, errors and timeouts as the blocking client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from .endpoints import Endpoint, parse_endpoint
from .errors import ConnectError, ConnectionClosed, ProtocolError, RequestTimeout
from .framing import DEFAULT_MAX_MESSAGE, Codec, make_codec

DEFAULT_TIMEOUT = 5.0
UDP_FIRST_RETRY = 0.5


class _DatagramReceiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | Exception] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.queue.put_nowait(exc)


class AsyncClient:
    def __init__(
        self,
        url: str | Endpoint,
        *,
        framing: str = "raw",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message: int = DEFAULT_MAX_MESSAGE,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_verify: bool = True,
        server_hostname: str | None = None,
    ) -> None:
        self.endpoint = url if isinstance(url, Endpoint) else parse_endpoint(url)
        self.timeout = timeout
        self._codec: Codec = make_codec(framing, max_message)
        self._tls = (tls_ca, tls_cert, tls_key, tls_verify, server_hostname)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._dgram: asyncio.DatagramTransport | None = None
        self._receiver: _DatagramReceiver | None = None

    async def connect(self) -> AsyncClient:
        ep = self.endpoint
        name = ep.url()
        try:
            await asyncio.wait_for(self._open(ep), self.timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(name, f"connect timed out after {self.timeout:g}s") from None
        except OSError as exc:
            raise ConnectError(name, exc.strerror or str(exc)) from None
        return self

    async def _open(self, ep: Endpoint) -> None:
        loop = asyncio.get_running_loop()
        receiver = _DatagramReceiver()
        if ep.is_stream:
            if ep.is_unix:
                self._reader, self._writer = await asyncio.open_unix_connection(ep.address())  # type: ignore[arg-type]
            else:
                ssl_ctx = None
                if ep.scheme == "tls":
                    import ssl

                    ca, cert, key, verify, _ = self._tls
                    ssl_ctx = ssl.create_default_context(cafile=ca)
                    if cert:
                        ssl_ctx.load_cert_chain(cert, key)
                    if not verify:
                        ssl_ctx.check_hostname = False
                        ssl_ctx.verify_mode = ssl.CERT_NONE
                self._reader, self._writer = await asyncio.open_connection(
                    ep.host,
                    ep.port,
                    ssl=ssl_ctx,
                    server_hostname=(self._tls[4] or ep.host) if ssl_ctx else None,
                )
        else:
            self._receiver = receiver
            if ep.is_unix:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.bind("")
                sock.connect(ep.address())
                sock.setblocking(False)
                transport, _ = await loop.create_datagram_endpoint(lambda: receiver, sock=sock)
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: receiver,
                    remote_addr=(ep.host, ep.port),
                )
            self._dgram = transport

    async def request(self, data: bytes) -> bytes:
        name = self.endpoint.url()
        try:
            if self._dgram is not None:
                return await asyncio.wait_for(self._datagram_request(data), self.timeout)
            return await asyncio.wait_for(self._stream_request(data), self.timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(name, f"no reply within {self.timeout:g}s") from None
        except ProtocolError as exc:
            raise ConnectionClosed(name, f"bad reply: {exc}") from None
        except ConnectionRefusedError:
            raise ConnectError(name, "connection refused") from None
        except OSError as exc:
            raise ConnectionClosed(name, exc.strerror or str(exc)) from None

    async def _stream_request(self, data: bytes) -> bytes:
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        codec = self._codec
        self._writer.write(codec.encode(data))
        await self._writer.drain()
        while True:
            msg = codec.next_message()
            if msg is not None:
                return msg
            chunk = await self._reader.read(65536)
            if not chunk:
                last = codec.end_of_input()
                if last is not None:
                    return last
                raise ConnectionClosed(
                    self.endpoint.url(), "server closed the connection before replying"
                )
            codec.feed(chunk)

    async def _datagram_request(self, data: bytes) -> bytes:
        assert self._dgram is not None and self._receiver is not None
        wait = UDP_FIRST_RETRY
        while True:
            self._dgram.sendto(data)
            try:
                got = await asyncio.wait_for(self._receiver.queue.get(), wait)
            except asyncio.TimeoutError:
                wait *= 2
                continue
            if isinstance(got, Exception):
                raise got
            return got

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._dgram is not None:
            self._dgram.close()
            self._dgram = None

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Connector:
    """Awaitable and async-context-manager result of :func:`aconnect`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def __await__(self) -> Any:
        return self._client.connect().__await__()

    async def __aenter__(self) -> AsyncClient:
        return await self._client.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()


def aconnect(url: str | Endpoint, **options: Any) -> _Connector:
    """``client = await aconnect(url)`` or ``async with aconnect(url) as client``."""
    return _Connector(AsyncClient(url, **options))
