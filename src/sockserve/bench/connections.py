"""The load engine's connections: opening, probing, losing and reopening them, and sending.

:class:`Connections` owns the sockets of one run and the bookkeeping that must
stay right when one fails (requests in flight count as errors, requests not yet
sent go back to the schedule); :class:`~sockserve.bench.engine.LoadEngine`
builds the run on it (phases, the receive loop, the open-loop schedule).

Error handling: a connection the server closes or resets, or a send that fails,
counts an error for each request it had in flight; the connection is closed and
its place in :attr:`Connections.order` is held by :data:`DEAD` until
:meth:`Connections.reopen` replaces it. A reconnect that fails is counted and
tried again at the next tick.

Resource handling: :meth:`Connections.close` closes every socket and the epoll
object; :meth:`LoadEngine.run` always calls it.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import ssl
import time
from collections import deque

from ..client.blocking import Client
from ..errors import ClientError, ConnectionClosed
from ..framing import LengthCodec
from .spec import LoadResult, LoadSpec

#: Receive buffer: any reply a benchmark sends fits, and it is allocated once.
RECV_SIZE = 256 * 1024
#: Deepest pipeline accepted: deeper only measures queueing inside socket buffers.
MAX_PIPELINE = 1024


class Conn:
    """One connection's state. ``times`` holds send (or due) times of requests in flight."""

    __slots__ = (
        "client",
        "codec",
        "fd",
        "got",
        "out",
        "queued",
        "recv_into",
        "send",
        "sock",
        "times",
    )

    def __init__(self, client: Client, sock: socket.socket, framing: str, max_message: int) -> None:
        self.client = client
        self.sock = sock
        self.fd = sock.fileno()
        self.recv_into = sock.recv_into
        self.send = sock.send
        self.times: deque[int] = deque()
        self.queued: deque[int] = deque()  # open loop: due but not yet sendable
        self.got = 0  # raw with reply_size: bytes of the current reply seen
        self.out = b""  # bytes a short send left behind
        self.codec = LengthCodec(max_message) if framing == "length" else None


class _DeadConn:
    """Placeholder in the connection order for a connection being reopened."""


DEAD: Conn = _DeadConn()  # type: ignore[assignment]


class Connections:
    """The sockets of one run, and the counters that sending and losing them keep right."""

    def __init__(self, spec: LoadSpec) -> None:
        if spec.conns < 1:
            raise ValueError("conns must be at least 1")
        if not 1 <= spec.pipeline <= MAX_PIPELINE:
            raise ValueError(f"pipeline must be within 1..{MAX_PIPELINE}")
        self.spec = spec
        self.request = spec.wire_request
        self.result = LoadResult(conns=spec.conns)
        self.by_fd: dict[int, Conn] = {}
        self.order: list[Conn] = []  # every connection of the run, DEAD while reopening
        self.dead: int = 0  # connections waiting to be reopened
        self.ep = select.epoll()
        # Requests may be pipelined only where replies can be told apart.
        self.depth = spec.pipeline
        self.limit = spec.requests  # None: run for the duration
        self.issued = 0  # requests sent (or scheduled) in the measured phase, for -n
        self.completed = 0  # answered + failed in the measured phase, for -n
        self.measuring = False
        self.reqs = [self.request * k for k in range(min(self.depth, 64) + 1)]

    # -- opening and closing -----------------------------------------------------------

    def connect(self) -> None:
        """Open every connection (blocking, before the clock starts) and probe the server.

        The probe is one request answered on the first connection, so that a
        server that is absent (UDP has no connect to fail), speaks another
        framing or hangs fails fast with ConnectError, RequestTimeout or
        ConnectionClosed instead of a run of timeouts.
        """
        if not self.order:
            self._probe()
        for _ in range(self.spec.conns - len(self.order)):
            self.order.append(self._open())

    def close(self) -> None:
        for conn in list(self.by_fd.values()):
            self._close(conn)
        self.ep.close()

    def _client(self) -> Client:
        spec = self.spec
        return Client(
            spec.endpoint,
            framing=spec.framing,
            timeout=spec.timeout or 5.0,
            max_message=spec.max_message,
            reply_size=spec.reply_size,
            **spec.tls.client_keywords(),
        )

    def _probe(self) -> None:
        spec = self.spec
        with self._client() as client:
            if spec.endpoint.is_stream and spec.framing == "raw" and spec.reply_size is None:
                # Any first bytes answer it: a raw request() would wait for the server's close.
                client.send(spec.payload)
                if not client.recv_stream():
                    raise ConnectionClosed(
                        spec.endpoint.url(), "server closed the connection before replying"
                    )
            else:
                client.request(spec.payload)

    def _open(self) -> Conn:
        client = self._client().connect()
        sock = client._sock  # the connected socket the blocking client set up (TLS included)
        assert sock is not None
        sock.setblocking(False)
        conn = Conn(client, sock, self.spec.framing, self.spec.max_message)
        self.by_fd[conn.fd] = conn
        self.ep.register(conn.fd, select.EPOLLIN)
        return conn

    def _close(self, conn: Conn) -> None:
        if self.by_fd.pop(conn.fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(conn.fd)
        conn.client.close()

    # -- losing and reopening ----------------------------------------------------------

    def lost(self, conn: Conn, reason: str, *, timeout: bool = False) -> None:
        """A stream connection failed: its in-flight requests fail; reopen it at the next tick."""
        n = len(conn.times)
        if timeout:
            self.result.timeouts += n
        elif n or reason:
            self.result.note_error(reason, max(n, 1))
        if self.measuring:
            self.completed += n
            self.issued -= len(conn.queued)  # not sent: reschedule them on a new connection
        self._close(conn)
        idx = self.order.index(conn)
        self.order[idx] = DEAD
        self.dead += 1

    def reopen(self) -> None:
        """Replace every :data:`DEAD` connection that can be reopened; count those that cannot."""
        for i, conn in enumerate(self.order):
            if conn is not DEAD:
                continue
            try:
                new = self._open()
            except ClientError as exc:
                self.result.note_error(f"reconnect failed: {exc.reason}")
                continue
            self.order[i] = new
            self.dead -= 1
            self.result.reconnects += 1
            if self.spec.rate is None:
                self.fill(new, time.perf_counter_ns())

    # -- sending -----------------------------------------------------------------------

    def _budget(self, k: int) -> int:
        """How many of ``k`` wanted requests may still be issued under ``-n``."""
        if self.limit is None or not self.measuring:
            return k
        k = min(k, self.limit - self.issued)
        return max(k, 0)

    def fill(self, conn: Conn, now: int) -> None:
        """Closed loop: top the connection up to the pipeline depth."""
        k = self._budget(self.depth - len(conn.times))
        if k <= 0:
            return
        if self.measuring:
            self.issued += k
        conn.times.extend([now] * k)
        self.write(conn, self.reqs[k] if k < len(self.reqs) else self.request * k)

    def write(self, conn: Conn, data: bytes) -> None:
        """Send ``data``, or queue what the socket does not take and wait for EPOLLOUT."""
        if conn.out:
            conn.out += data
            return
        try:
            n = conn.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            n = 0
        except OSError as exc:
            self.lost(conn, describe_error(exc))
            return
        if n < len(data):
            conn.out = data[n:]
            self.ep.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def flush(self, conn: Conn) -> None:
        """The socket is writable again: send what a short send left behind."""
        data, conn.out = conn.out, b""
        self.ep.modify(conn.fd, select.EPOLLIN)
        self.write(conn, data)


def describe_error(exc: OSError) -> str:
    """The error-reason key of a failed socket call, as the report lists it."""
    if exc.errno == errno.ECONNRESET:
        return "connection reset by the server"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    if exc.errno == errno.EPIPE:
        return "connection closed by the server"
    return exc.strerror or str(exc) or type(exc).__name__
