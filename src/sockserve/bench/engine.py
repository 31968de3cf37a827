"""The load engine: many non-blocking sockets driven by ``select.epoll`` in one thread.

Why not asyncio: a generator must be faster than the server it measures. A
bare epoll loop over ``recv_into`` a reused buffer costs a few microseconds per
request in CPython, several times less than an asyncio Protocol round trip, so
one process drives well over half of what a C generator does.

Two loops:

* **closed** (default): each connection keeps ``pipeline`` requests in flight
  and sends the next one as soon as a reply arrives; latency runs from the send.
* **open** (``rate``): request *k* is due at ``start + k / rate`` and goes to
  connection ``k % conns``; if that connection is busy the request waits its
  turn, and its latency runs from the time it was *due*, not from when it could
  be sent. That is wrk2's answer to coordinated omission: a stalled server shows
  up as the latency its users would have seen.

Replies are counted without building messages where the framing allows it:
``raw`` takes each chunk received as one reply (the textbook client's view) or,
with ``reply_size``, every ``reply_size`` bytes; ``line`` counts newlines (the
same split the project's LineCodec makes); ``length`` uses the project's
LengthCodec. Datagram endpoints: one datagram is one reply.

Error handling: failing to open the *first* connections raises
:class:`~sockserve.errors.ConnectError` (nothing was measured). Later, a
connection the server closes or resets counts an error for each request it had
in flight and is reopened; a request unanswered after ``timeout`` counts as a
timeout (a stream connection is then reopened, since a late reply could no
longer be matched; a datagram request is simply sent again). If no connection
can be reopened, the run ends early with ``aborted`` set. Ctrl-C (KeyboardInterrupt)
ends the measured phase early too, with ``interrupted`` set: what was measured
so far is the result, and the CLI reports it.

Resource handling: every socket is closed when :meth:`LoadEngine.run` returns,
whatever happens.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .._engine.fastio import stream_recv_into, stream_send
from ..client.blocking import Client
from ..endpoints import Endpoint
from ..errors import ClientError, ConnectionClosed
from ..framing import DEFAULT_MAX_MESSAGE, LengthCodec, make_codec
from .histogram import HALF, MAX_VALUE, SUB_BITS, Histogram

#: Housekeeping (timeouts, reconnects, progress) runs this often, in nanoseconds.
TICK_NS = 100_000_000
#: Receive buffer: any reply a benchmark sends fits, and it is allocated once.
RECV_SIZE = 256 * 1024
#: Deepest pipeline accepted: deeper only measures queueing inside socket buffers.
MAX_PIPELINE = 1024

Progress = Callable[[float, int, int, int], None]


@dataclass(frozen=True)
class TlsOptions:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True
    server_hostname: str | None = None


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, how hard and for how long (one process's share)."""

    endpoint: Endpoint
    payload: bytes
    conns: int = 50
    duration: float | None = 10.0  #: seconds measured; ignored when ``requests`` is set
    requests: int | None = None  #: stop after this many requests complete
    pipeline: int = 1
    rate: float | None = None  #: requests/s for the open loop; None = closed loop
    framing: str = "raw"
    reply_size: int | None = None  #: raw framing: bytes per reply (None: one chunk = one reply)
    timeout: float | None = 5.0
    warmup: float = 0.0
    max_message: int = DEFAULT_MAX_MESSAGE
    tls: TlsOptions = field(default_factory=TlsOptions)

    @property
    def wire_request(self) -> bytes:
        """The request as it goes on the wire: the payload framed (datagrams: as is)."""
        if not self.endpoint.is_stream:
            return self.payload
        return make_codec(self.framing, max(self.max_message, len(self.payload))).encode(
            self.payload
        )


@dataclass
class LoadResult:
    """What one engine (one process) measured; :meth:`merge` folds workers together."""

    hist: Histogram = field(default_factory=Histogram)
    errors: int = 0
    timeouts: int = 0
    elapsed: float = 0.0  #: seconds measured (warm-up excluded)
    conns: int = 0
    reconnects: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)
    aborted: str | None = None
    interrupted: bool = False  #: stopped early by Ctrl-C: a partial, but true, measurement

    @property
    def requests(self) -> int:
        return self.hist.count

    @property
    def rps(self) -> float:
        return self.hist.count / self.elapsed if self.elapsed > 0 else 0.0

    def note_error(self, reason: str, n: int = 1) -> None:
        self.errors += n
        self.error_reasons[reason] = self.error_reasons.get(reason, 0) + n

    def merge(self, other: LoadResult) -> None:
        self.hist.merge(other.hist)
        self.errors += other.errors
        self.timeouts += other.timeouts
        self.elapsed = max(self.elapsed, other.elapsed)
        self.conns += other.conns
        self.reconnects += other.reconnects
        for k, v in other.error_reasons.items():
            self.error_reasons[k] = self.error_reasons.get(k, 0) + v
        self.aborted = self.aborted or other.aborted
        self.interrupted = self.interrupted or other.interrupted

    def to_dict(self) -> dict[str, object]:
        return {
            "hist": self.hist.to_dict(),
            "errors": self.errors,
            "timeouts": self.timeouts,
            "elapsed": self.elapsed,
            "conns": self.conns,
            "reconnects": self.reconnects,
            "error_reasons": self.error_reasons,
            "aborted": self.aborted,
            "interrupted": self.interrupted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> LoadResult:
        hist = d["hist"]
        assert isinstance(hist, dict)
        reasons = d.get("error_reasons") or {}
        assert isinstance(reasons, dict)
        aborted = d.get("aborted")
        return cls(
            hist=Histogram.from_dict(hist),
            errors=int(d["errors"]),  # type: ignore[call-overload]
            timeouts=int(d["timeouts"]),  # type: ignore[call-overload]
            elapsed=float(d["elapsed"]),  # type: ignore[arg-type]
            conns=int(d["conns"]),  # type: ignore[call-overload]
            reconnects=int(d["reconnects"]),  # type: ignore[call-overload]
            error_reasons={str(k): int(v) for k, v in reasons.items()},
            aborted=str(aborted) if aborted else None,
            interrupted=bool(d.get("interrupted")),
        )


class _Conn:
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


class LoadEngine:
    """Runs one :class:`LoadSpec` in this process and returns a :class:`LoadResult`."""

    def __init__(self, spec: LoadSpec, progress: Progress | None = None) -> None:
        if spec.conns < 1:
            raise ValueError("conns must be at least 1")
        if not 1 <= spec.pipeline <= MAX_PIPELINE:
            raise ValueError(f"pipeline must be within 1..{MAX_PIPELINE}")
        self.spec = spec
        self.progress = progress
        self.request = spec.wire_request
        self.result = LoadResult(conns=spec.conns)
        self.by_fd: dict[int, _Conn] = {}
        self.dead: int = 0  # connections waiting to be reopened
        self.ep = select.epoll()
        self.buf = bytearray(RECV_SIZE)
        self.tls = spec.endpoint.scheme == "tls"
        stream = spec.endpoint.is_stream
        if not stream:
            self.mode = "dgram"
        elif spec.framing == "line":
            self.mode = "line"
        elif spec.framing == "length":
            self.mode = "length"
        elif spec.reply_size:
            self.mode = "size"
        else:
            self.mode = "chunk"
        # Requests may be pipelined only where replies can be told apart.
        self.depth = spec.pipeline
        self.timeout_ns = int(spec.timeout * 1e9) if spec.timeout else 0
        self.limit = spec.requests  # None: run for the duration
        self.issued = 0  # requests sent (or scheduled) in the measured phase, for -n
        self.completed = 0  # answered + failed in the measured phase, for -n
        self.measuring = False
        self.reqs = [self.request * k for k in range(min(self.depth, 64) + 1)]
        # Open loop schedule.
        self.interval_ns = max(1, int(1e9 / spec.rate)) if spec.rate else 0
        self.next_due = 0
        self.due_k = 0
        self.order: list[_Conn] = []

    # -- connections -------------------------------------------------------------------

    def _client(self) -> Client:
        spec = self.spec
        t = spec.tls
        return Client(
            spec.endpoint,
            framing=spec.framing,
            timeout=spec.timeout or 5.0,
            max_message=spec.max_message,
            tls_ca=t.ca,
            tls_cert=t.cert,
            tls_key=t.key,
            tls_verify=t.verify,
            server_hostname=t.server_hostname,
            reply_size=spec.reply_size,
        )

    def _open(self) -> _Conn:
        client = self._client().connect()
        sock = client._sock  # the connected socket the blocking client set up (TLS included)
        assert sock is not None
        sock.setblocking(False)
        conn = _Conn(client, sock, self.spec.framing, self.spec.max_message)
        self.by_fd[conn.fd] = conn
        self.ep.register(conn.fd, select.EPOLLIN)
        return conn

    def _close(self, conn: _Conn) -> None:
        if self.by_fd.pop(conn.fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(conn.fd)
        conn.client.close()

    def _lost(self, conn: _Conn, reason: str, *, timeout: bool = False) -> None:
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
        self.order[idx] = _DEAD
        self.dead += 1

    def _reopen(self) -> None:
        for i, conn in enumerate(self.order):
            if conn is not _DEAD:
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
                self._fill(new, time.perf_counter_ns())

    # -- sending -----------------------------------------------------------------------

    def _budget(self, k: int) -> int:
        """How many of ``k`` wanted requests may still be issued under ``-n``."""
        if self.limit is None or not self.measuring:
            return k
        k = min(k, self.limit - self.issued)
        return max(k, 0)

    def _fill(self, conn: _Conn, now: int) -> None:
        """Closed loop: top the connection up to the pipeline depth."""
        k = self._budget(self.depth - len(conn.times))
        if k <= 0:
            return
        if self.measuring:
            self.issued += k
        conn.times.extend([now] * k)
        self._write(conn, self.reqs[k] if k < len(self.reqs) else self.request * k)

    def _write(self, conn: _Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            n = conn.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            n = 0
        except OSError as exc:
            self._lost(conn, _reason(exc))
            return
        if n < len(data):
            conn.out = data[n:]
            self.ep.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, conn: _Conn) -> None:
        data, conn.out = conn.out, b""
        self.ep.modify(conn.fd, select.EPOLLIN)
        self._write(conn, data)

    # -- the run -----------------------------------------------------------------------

    def run(self) -> LoadResult:
        """Connect, drive, close: the whole run in this process."""
        try:
            self.connect()
            return self.drive()
        finally:
            self.close()

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

    def drive(self) -> LoadResult:
        """Warm up, then measure; the connections stay open for :meth:`close`."""
        self._run_phases()
        return self.result

    def close(self) -> None:
        for conn in list(self.by_fd.values()):
            self._close(conn)
        self.ep.close()

    def _run_phases(self) -> None:
        spec = self.spec
        res = self.result
        start = time.perf_counter_ns()
        hist = res.hist
        if spec.rate is None:
            for conn in self.order:
                self._fill(conn, start)
        else:
            self.next_due = start
        if spec.warmup > 0:
            try:
                self._loop(start + int(spec.warmup * 1e9), start, warm=True)
            except KeyboardInterrupt:
                hist.clear()  # nothing measured yet
                res.interrupted = True
                return
            hist.clear()
            res.errors = res.timeouts = res.reconnects = 0
            res.error_reasons.clear()
        self.measuring = True
        begin = time.perf_counter_ns()
        if self.limit is not None:
            # Requests already in flight from the warm-up count toward -n.
            self.issued = sum(len(c.times) for c in self.order if c is not _DEAD)
            end = 1 << 62
        else:
            end = begin + int((spec.duration or 0) * 1e9)
        try:
            last = self._loop(end, begin, warm=False)
        except KeyboardInterrupt:
            # Ctrl-C: stop here; what was measured up to now is the result.
            last = time.perf_counter_ns()
            res.interrupted = True
        res.elapsed = max(0, min(last, end) - begin) / 1e9

    def _done(self) -> bool:
        return self.limit is not None and self.measuring and self.completed >= self.limit

    def _loop(self, end: int, begin: int, *, warm: bool) -> int:
        """Run until ``end`` (ns) or the ``-n`` budget is spent; return the time it stopped."""
        poll = self.ep.poll
        epfd = [self.ep.fileno()]
        sleep_until_ready = select.select
        perf = time.perf_counter_ns
        by_fd = self.by_fd
        buf = self.buf
        hist = self.result.hist
        counts = hist.counts
        mode = self.mode
        dgram = mode == "dgram"
        rsize = self.spec.reply_size or 1
        tls = self.tls
        # Plain sockets: the C helper's recv/send (no GIL round trip per call).
        recv_into = stream_recv_into
        send = stream_send
        open_loop = self.spec.rate is not None
        depth = self.depth
        reqs = self.reqs
        one = self.request
        limit = self.limit
        measuring = self.measuring
        EPOLLIN = select.EPOLLIN
        EPOLLOUT = select.EPOLLOUT
        sub_bits = SUB_BITS
        half = HALF
        maxv = MAX_VALUE
        n_rec = 0
        total = 0
        low = maxv
        high = 0
        now = perf()
        next_tick = now + TICK_NS
        timeout = 0.05
        try:
            while True:
                if open_loop:
                    timeout = self._schedule(now, end)
                    if timeout > 0:
                        # select() sleeps to the microsecond (epoll only to the millisecond)
                        # and wakes when the epoll fd has events: no spinning between sends.
                        sleep_until_ready(epfd, (), (), timeout)
                        timeout = 0.0
                events = poll(timeout)
                now = perf()
                for fd, ev in events:
                    conn = by_fd.get(fd)
                    if conn is None:
                        continue
                    if ev & EPOLLOUT and conn.out:
                        self._flush(conn)
                        if not ev & EPOLLIN or conn.fd not in by_fd:
                            continue
                    # EPOLLIN, or EPOLLERR/EPOLLHUP: the recv below says which error.
                    replies = 0
                    while True:
                        try:
                            n = conn.recv_into(buf) if tls else recv_into(fd, buf)
                        except (BlockingIOError, ssl.SSLWantReadError):
                            break
                        except OSError as exc:
                            n = -1
                            reason = _reason(exc)
                        if n <= 0:
                            if dgram and n < 0:
                                # e.g. ECONNREFUSED from an ICMP error: keep the socket.
                                self.result.note_error(reason)
                                break
                            self._lost(
                                conn, "connection closed by the server" if n == 0 else reason
                            )
                            replies = -1
                            break
                        if mode == "chunk" or dgram:
                            replies += 1
                        elif mode == "line":
                            replies += buf.count(b"\n", 0, n)
                        elif mode == "size":
                            got = conn.got + n
                            replies += got // rsize
                            conn.got = got % rsize
                        else:
                            codec = conn.codec
                            assert codec is not None
                            try:
                                codec.feed(bytes(buf[:n]))
                                while codec.next_message() is not None:
                                    replies += 1
                            except Exception as exc:
                                self._lost(conn, f"bad reply: {exc}")
                                replies = -1
                                break
                        if not tls:
                            break  # level-triggered: epoll reports what is left
                    if replies <= 0:
                        continue
                    times = conn.times
                    if replies > len(times):
                        self.result.note_error("unexpected reply", replies - len(times))
                        replies = len(times)
                        if not replies:
                            continue
                    for _ in range(replies):
                        v = now - times.popleft()
                        if v > high:
                            high = v
                        if v < low:
                            low = v
                        total += v
                        s = v.bit_length() - sub_bits
                        if s > 0:
                            if v > maxv:
                                v = maxv
                                s = v.bit_length() - sub_bits
                            counts[(v >> s) + s * half] += 1
                        else:
                            counts[v] += 1
                    n_rec += replies
                    if open_loop:
                        queued = conn.queued
                        k = min(len(queued), depth - len(times))
                        if k > 0:
                            for _ in range(k):
                                times.append(queued.popleft())
                            self._write(conn, reqs[k] if k < len(reqs) else one * k)
                    else:
                        k = depth - len(times)
                        if limit is not None and measuring:
                            k = min(k, limit - self.issued)
                            self.issued += max(k, 0)
                        if k == 1:
                            times.append(now)
                            if conn.out:
                                conn.out += one
                            else:
                                try:
                                    sent = conn.send(one) if tls else send(fd, one)
                                except OSError:
                                    sent = -1
                                if sent != len(one):
                                    times.pop()
                                    if measuring and limit is not None:
                                        self.issued -= 1
                                    self._fill(conn, now)
                        elif k > 0:
                            times.extend([now] * k)
                            self._write(conn, reqs[k] if k < len(reqs) else one * k)
                if measuring and limit is not None:
                    self.completed += n_rec
                    self._flush_stats(n_rec, total, low, high)
                    n_rec = total = high = 0
                    low = maxv
                    if self.completed >= limit:
                        return now
                if now >= end:
                    return now
                if now >= next_tick:
                    next_tick = now + TICK_NS
                    self._flush_stats(n_rec, total, low, high)
                    n_rec = total = high = 0
                    low = maxv
                    self._housekeeping(now, begin, warm)
                    if self._done():
                        return now
                    if self.result.aborted:
                        return now
        finally:
            self._flush_stats(n_rec, total, low, high)

    def _flush_stats(self, n: int, total: int, low: int, high: int) -> None:
        if n:
            self.result.hist.note(n, total, low, high)

    def _schedule(self, now: int, end: int) -> float:
        """Open loop: hand out every request due by ``now``; return seconds until the next."""
        interval = self.interval_ns
        order = self.order
        nconn = len(order)
        while self.next_due <= now and self.next_due < end:
            if self.limit is not None and self.measuring and self.issued >= self.limit:
                return 0.05
            conn = order[self.due_k % nconn]
            due = self.next_due
            self.due_k += 1
            self.next_due = due + interval
            if conn is _DEAD:
                continue  # its share is lost while it reconnects; counted as errors already
            if self.measuring:
                self.issued += 1
            if len(conn.times) < self.depth and not conn.queued:
                conn.times.append(due)
                self._write(conn, self.request)
            else:
                conn.queued.append(due)
        wait = self.next_due - time.perf_counter_ns()
        # Seconds to sleep until the next request is due (the caller sleeps to the µs);
        # no longer than a tick, so housekeeping still runs at a low rate.
        return min(max(wait, 0), TICK_NS) / 1e9

    def _housekeeping(self, now: int, begin: int, warm: bool) -> None:
        res = self.result
        if self.timeout_ns:
            limit = now - self.timeout_ns
            for conn in list(self.by_fd.values()):
                times = conn.times
                if times and times[0] < limit:
                    if self.mode == "dgram":
                        # Lost datagram: count it and send a replacement.
                        times.popleft()
                        res.timeouts += 1
                        if self.measuring:
                            self.completed += 1
                        if self.spec.rate is None:
                            self._fill(conn, now)
                        elif conn.queued:
                            times.append(conn.queued.popleft())
                            self._write(conn, self.request)
                    else:
                        self._lost(conn, "", timeout=True)
        if self.dead:
            self._reopen()
            if self.dead == len(self.order):
                res.aborted = "no connection could be reopened"
        if self.progress is not None:
            elapsed = (now - begin) / 1e9
            self.progress(-1.0 if warm else elapsed, res.hist.count, res.errors, res.timeouts)


class _DeadConn:
    """Placeholder in the connection order for a connection being reopened."""


_DEAD: _Conn = _DeadConn()  # type: ignore[assignment]


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ECONNRESET:
        return "connection reset by the server"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused"
    if exc.errno == errno.EPIPE:
        return "connection closed by the server"
    return exc.strerror or str(exc) or type(exc).__name__


def run_load(spec: LoadSpec, progress: Progress | None = None) -> LoadResult:
    """Open ``spec.conns`` connections, drive them, close them; raise ConnectError if one fails."""
    return LoadEngine(spec, progress).run()
