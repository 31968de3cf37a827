"""The asyncio client: ``async with aconnect(url) as c: reply = await c.request(b"hi")``.

Same endpoints, framings, errors, timeouts and reply rules as the blocking client
(see :mod:`sockserve.client`): ``timeout`` is a deadline for the whole request,
raw framing without ``reply_size`` gives each request a connection of its own.

Several tasks may call :meth:`AsyncClient.request` on one client at once: a lock
lets one request at a time use the connection, so every task gets its own reply
(the wait for the lock counts toward that request's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from typing import Any

from ..endpoints import Endpoint, parse_endpoint
from ..errors import (
    ConnectError,
    ConnectionClosed,
    ProtocolError,
    ReplyTooLarge,
    RequestTimeout,
    RequestTooLarge,
)
from ..framing import DEFAULT_MAX_MESSAGE, Codec, make_codec
from .blocking import RAW_READ, check_tls_files, ssl_context

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
        reply_size: int | None = None,
    ) -> None:
        self.endpoint = url if isinstance(url, Endpoint) else parse_endpoint(url)
        self.timeout = timeout
        self.framing = framing
        self.max_message = max_message
        if reply_size is not None and reply_size < 1:
            raise ValueError("reply_size must be at least 1")
        self.reply_size = reply_size
        self._codec: Codec = make_codec(framing, max_message)
        check_tls_files(tls_ca, tls_cert, tls_key)
        self._tls = (tls_ca, tls_cert, tls_key, tls_verify, server_hostname)
        self._lock = asyncio.Lock()
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
                    ssl_ctx = ssl_context(ca, cert, key)
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
        """Send one request and return its whole reply; safe to call from several tasks."""
        name = self.endpoint.url()
        try:
            return await asyncio.wait_for(self._locked_request(data), self.timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(name, f"no reply within {self.timeout:g}s") from None
        except ProtocolError as exc:
            raise ConnectionClosed(name, f"bad reply: {exc}") from None
        except ConnectionRefusedError:
            raise ConnectError(name, "connection refused") from None
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise RequestTooLarge(
                    name, f"a {len(data)}-byte request does not fit in one datagram"
                ) from None
            raise ConnectionClosed(name, exc.strerror or str(exc)) from None

    async def _locked_request(self, data: bytes) -> bytes:
        async with self._lock:
            if self.endpoint.is_stream:
                return await self._stream_request(data)
            if self._dgram is None:
                await self._open(self.endpoint)
            return await self._datagram_request(data)

    async def _stream_request(self, data: bytes) -> bytes:
        if self._writer is None:
            await self._open(self.endpoint)
        assert self._reader is not None and self._writer is not None
        if self.framing == "raw":
            if self.reply_size is None:
                return await self._raw_request(data)
            return await self._sized_request(data)
        codec = self._codec
        self._writer.write(codec.encode(data))
        await self._writer.drain()
        while True:
            msg = codec.next_message()
            if msg is not None:
                return msg
            chunk = await self._reader.read(RAW_READ)
            if not chunk:
                last = codec.end_of_input()
                if last is not None:
                    return last
                raise ConnectionClosed(
                    self.endpoint.url(), "server closed the connection before replying"
                )
            codec.feed(chunk)

    async def _raw_request(self, data: bytes) -> bytes:
        """One request per connection: send, half-close, the reply runs to the server's close."""
        assert self._reader is not None and self._writer is not None
        name = self.endpoint.url()
        try:
            self._writer.write(data)
            await self._writer.drain()
            if self._writer.can_write_eof():
                self._writer.write_eof()
            else:  # TLS: a TCP half-close under the TLS layer, as the blocking client does
                self._writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = await self._reader.read(RAW_READ)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_message:
                    raise ReplyTooLarge(
                        name,
                        f"reply longer than the {self.max_message}-byte limit (raw framing "
                        "reads to the server's close): raise max_message, or use line/length",
                    )
                chunks.append(chunk)
        finally:
            await self._close_stream()
        if not size:
            raise ConnectionClosed(name, "server closed the connection before replying")
        return b"".join(chunks)

    async def _sized_request(self, data: bytes) -> bytes:
        assert self._reader is not None and self._writer is not None
        size = self.reply_size
        assert size is not None
        self._writer.write(data)
        await self._writer.drain()
        try:
            return await self._reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionClosed(
                self.endpoint.url(),
                f"server closed the connection after {len(exc.partial)} of {size} bytes",
            ) from None

    async def _datagram_request(self, data: bytes) -> bytes:
        assert self._dgram is not None and self._receiver is not None
        queue = self._receiver.queue
        while not queue.empty():  # a late reply to an earlier, timed-out request
            queue.get_nowait()
        wait = UDP_FIRST_RETRY
        while True:
            self._dgram.sendto(data)
            try:
                got = await asyncio.wait_for(queue.get(), wait)
            except asyncio.TimeoutError:
                wait *= 2
                continue
            if isinstance(got, Exception):
                raise got
            if len(got) > self.max_message:
                raise ReplyTooLarge(
                    self.endpoint.url(),
                    f"reply datagram longer than the {self.max_message}-byte limit (max_message)",
                )
            return got

    async def _close_stream(self) -> None:
        if self._writer is not None:
            writer, self._writer, self._reader = self._writer, None, None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        await self._close_stream()
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
