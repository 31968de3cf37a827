"""The asyncio client: ``async with aconnect(url) as c: reply = await c.request(b"hi")``.

Same options, endpoints, framings, errors, timeouts and reply rules as the blocking
client (:mod:`sockserve.client.blocking`; the settings, TLS context and error
wording are shared in :mod:`sockserve.client.common`): ``timeout`` is a deadline
for the whole request, a connect that fails or runs out of time is a ConnectError,
raw framing without ``reply_size`` gives each request a connection of its own, and
a failed stream request closes its connection so a late reply is never taken for
the next request's.

Several tasks may call :meth:`AsyncClient.request` on one client at once: a lock
lets one request at a time use the connection, so every task gets its own reply
(the wait for the lock counts toward that request's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from ..endpoints import Endpoint
from ..errors import ClientError, ProtocolError
from . import common
from .common import RAW_READ, UDP_FIRST_RETRY, ClientSettings


class _DatagramReceiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | Exception] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.queue.put_nowait(exc)


class AsyncClient(ClientSettings):
    """A connection to one endpoint, for asyncio; takes the blocking client's options."""

    _lock: asyncio.Lock | None = None
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _dgram: asyncio.DatagramTransport | None = None
    _receiver: _DatagramReceiver | None = None
    #: Bytes of the current raw reply received so far (for the timeout's message).
    _received = 0

    def _open_now(self) -> bool:
        return (self._writer if self.endpoint.is_stream else self._dgram) is not None

    async def connect(self) -> AsyncClient:
        """Open the connection (no-op when open); ConnectError if it cannot be opened in time."""
        if not self._open_now():
            await self._connect(self.timeout)
        return self

    async def _connect(self, timeout: float | None) -> None:
        ep = self.endpoint
        try:
            await asyncio.wait_for(self._open(ep), timeout)
        except ClientError:
            raise
        except (asyncio.TimeoutError, TimeoutError):
            raise common.connect_timed_out(self.name, self.timeout, ep.scheme == "tls") from None
        except socket.gaierror as exc:
            raise common.cannot_resolve(self.name, ep.host, exc) from None
        except OSError as exc:
            raise common.connect_failed(self.name, exc) from None

    async def _open(self, ep: Endpoint) -> None:
        if ep.is_stream:
            await self._open_stream(ep)
            return
        loop = asyncio.get_running_loop()
        receiver = _DatagramReceiver()
        if ep.is_unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.bind("")  # Linux autobind: an address of our own for the replies
                sock.connect(ep.address())
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            transport, _ = await loop.create_datagram_endpoint(lambda: receiver, sock=sock)
        else:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: receiver, remote_addr=(ep.host, ep.port), local_addr=self.source
            )
        self._receiver = receiver
        self._dgram = transport

    async def _open_stream(self, ep: Endpoint) -> None:
        if ep.is_unix:
            path = ep.address()  # str, or bytes for an abstract name (connect takes both)
            self._reader, self._writer = await asyncio.open_unix_connection(path)  # type: ignore[arg-type]
            return
        if ep.scheme != "tls":
            self._reader, self._writer = await asyncio.open_connection(
                ep.host, ep.port, local_addr=self.source
            )
            return
        import ssl

        try:
            self._reader, self._writer = await asyncio.open_connection(
                ep.host,
                ep.port,
                ssl=self.ssl_context(),
                server_hostname=self.server_hostname,
                local_addr=self.source,
            )
        except ssl.SSLError as exc:
            raise common.tls_failed(self.name, exc) from None

    # -- requests ----------------------------------------------------------------------

    async def request(self, data: bytes) -> bytes:
        """Send one request and return its whole reply; safe to call from several tasks."""
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout is None else loop.time() + self.timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        if self._lock is None:
            self._lock = asyncio.Lock()
        lock = self._lock
        try:
            await asyncio.wait_for(lock.acquire(), left())
        except asyncio.TimeoutError:
            raise common.timed_out(self.name, self.timeout, "no turn on the connection") from None
        try:
            if not self._open_now():
                await self._connect(left())
            return await self._exchange(data, left())
        finally:
            lock.release()

    async def _exchange(self, data: bytes, timeout: float | None) -> bytes:
        """One request on the open connection, translating its failures."""
        self._received = 0
        try:
            if not self.endpoint.is_stream:
                return await asyncio.wait_for(self._datagram_request(data), timeout)
            if self.raw_to_close:
                return await asyncio.wait_for(self._raw_request(data), timeout)
            try:
                return await asyncio.wait_for(self._stream_request(data), timeout)
            except BaseException:
                # The reply's rest may still come: on this connection it would pass for the next.
                await self._close_stream()
                self._reset_codec()
                raise
        except ClientError:
            raise
        except (asyncio.TimeoutError, TimeoutError):
            raw = self.raw_to_close
            what = common.incomplete(self._received) if raw else "no reply"
            raise common.timed_out(self.name, self.timeout, what, raw) from None
        except ProtocolError as exc:
            raise common.bad_reply(self.name, exc) from None
        except OSError as exc:
            if self._dgram is not None:
                sock = self._dgram.get_extra_info("socket")
                raise common.datagram_failed(self.endpoint, exc, len(data), sock) from None
            raise common.connection_lost(self.name, exc) from None

    async def _stream_request(self, data: bytes) -> bytes:
        assert self._reader is not None and self._writer is not None
        if self.framing == "raw":
            return await self._sized_request(data)
        codec = self._codec
        self._writer.write(codec.encode(data))
        await self._writer.drain()
        reply = codec.next_message()
        while reply is None:
            reply = common.feed_reply(codec, await self._reader.read(RAW_READ), self.name)
        return reply

    async def _raw_request(self, data: bytes) -> bytes:
        """One request per connection: send, half-close, the reply runs to the server's close."""
        assert self._reader is not None and self._writer is not None
        try:
            self._writer.write(data)
            await self._writer.drain()
            if self._writer.can_write_eof():
                self._writer.write_eof()
            else:  # TLS: a TCP half-close under the TLS layer, as the blocking client does
                self._writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
            chunks: list[bytes] = []
            while True:
                chunk = await self._reader.read(RAW_READ)
                if not chunk:
                    break
                self._received += len(chunk)
                if self._received > self.max_message:
                    raise common.raw_reply_too_large(self.name, self.max_message)
                chunks.append(chunk)
        finally:
            await self._close_stream()
        if not self._received:
            raise common.closed_before_reply(self.name)
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
            raise common.closed_after(self.name, len(exc.partial), size) from None

    async def _datagram_request(self, data: bytes) -> bytes:
        assert self._dgram is not None and self._receiver is not None
        queue = self._receiver.queue
        while not queue.empty():  # late replies to a timed-out or retransmitted request
            queue.get_nowait()
        wait = UDP_FIRST_RETRY
        while True:
            self._dgram.sendto(data)
            try:
                got = await asyncio.wait_for(queue.get(), wait)
            except asyncio.TimeoutError:
                wait *= 2  # lost request or reply: send it again
                continue
            if isinstance(got, Exception):
                raise got
            if len(got) > self.max_message:
                raise common.datagram_reply_too_large(self.name, self.max_message)
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
