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

Layout: :mod:`.spec` holds the plain data (what to run, what was measured),
:mod:`.connections` the sockets and the sending and reconnecting; this module
the run itself: warm-up and measured phases, the receive loop, the open-loop
schedule and the housekeeping tick.
"""

from __future__ import annotations

import select
import ssl
import time

from .._engine.fastio import stream_recv_into, stream_send
from .connections import DEAD, RECV_SIZE, Connections, describe_error
from .histogram import HALF, MAX_VALUE, SUB_BITS
from .spec import LoadResult, LoadSpec, Progress

#: Housekeeping (timeouts, reconnects, progress) runs this often, in nanoseconds.
TICK_NS = 100_000_000


class LoadEngine(Connections):
    """Runs one :class:`LoadSpec` in this process and returns a :class:`LoadResult`."""

    def __init__(self, spec: LoadSpec, progress: Progress | None = None) -> None:
        super().__init__(spec)
        self.progress = progress
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
        self.timeout_ns = int(spec.timeout * 1e9) if spec.timeout else 0
        # Open loop schedule.
        self.interval_ns = max(1, int(1e9 / spec.rate)) if spec.rate else 0
        self.next_due = 0
        self.due_k = 0

    # -- the run -----------------------------------------------------------------------

    def run(self) -> LoadResult:
        """Connect, drive, close: the whole run in this process."""
        try:
            self.connect()
            return self.drive()
        finally:
            self.close()

    def drive(self) -> LoadResult:
        """Warm up, then measure; the connections stay open for :meth:`close`."""
        self._run_phases()
        return self.result

    def _run_phases(self) -> None:
        spec = self.spec
        res = self.result
        start = time.perf_counter_ns()
        hist = res.hist
        if spec.rate is None:
            for conn in self.order:
                self.fill(conn, start)
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
            self.issued = sum(len(c.times) for c in self.order if c is not DEAD)
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
        # The loop below runs per reply: everything it touches is a local (CPython reads a
        # local in one step, an attribute in a dictionary lookup or more).
        poll, epfd, sleep_until_ready = self.ep.poll, [self.ep.fileno()], select.select
        perf, by_fd, buf = time.perf_counter_ns, self.by_fd, self.buf
        counts = self.result.hist.counts
        mode, rsize, tls = self.mode, self.spec.reply_size or 1, self.tls
        dgram = mode == "dgram"
        # Plain sockets: the C helper's recv/send (no GIL round trip per call).
        recv_into, send = stream_recv_into, stream_send
        open_loop = self.spec.rate is not None
        depth, reqs, one = self.depth, self.reqs, self.request
        limit, measuring = self.limit, self.measuring
        EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
        sub_bits, half, maxv = SUB_BITS, HALF, MAX_VALUE
        n_rec = total = high = 0
        low = maxv
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
                        self.flush(conn)
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
                            reason = describe_error(exc)
                        if n <= 0:
                            if dgram and n < 0:
                                # e.g. ECONNREFUSED from an ICMP error: keep the socket.
                                self.result.note_error(reason)
                                break
                            self.lost(conn, "connection closed by the server" if n == 0 else reason)
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
                                self.lost(conn, f"bad reply: {exc}")
                                replies = -1
                                break
                        if not tls or not conn.sock.pending():  # type: ignore[attr-defined]
                            # Level-triggered: epoll reports what the kernel holds; TLS
                            # reads again only for what OpenSSL decrypted and holds (not
                            # to raise SSLWantReadError, a cost per reply).
                            break
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
                            self.write(conn, reqs[k] if k < len(reqs) else one * k)
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
                                    self.fill(conn, now)
                        elif k > 0:
                            times.extend([now] * k)
                            self.write(conn, reqs[k] if k < len(reqs) else one * k)
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
            if conn is DEAD:
                continue  # its share is lost while it reconnects; counted as errors already
            if self.measuring:
                self.issued += 1
            if len(conn.times) < self.depth and not conn.queued:
                conn.times.append(due)
                self.write(conn, self.request)
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
                            self.fill(conn, now)
                        elif conn.queued:
                            times.append(conn.queued.popleft())
                            self.write(conn, self.request)
                    else:
                        self.lost(conn, "", timeout=True)
        if self.dead:
            self.reopen()
            if self.dead == len(self.order):
                res.aborted = "no connection could be reopened"
        if self.progress is not None:
            elapsed = (now - begin) / 1e9
            self.progress(-1.0 if warm else elapsed, res.hist.count, res.errors, res.timeouts)


def run_load(spec: LoadSpec, progress: Progress | None = None) -> LoadResult:
    """Open ``spec.conns`` connections, drive them, close them; raise ConnectError if one fails."""
    return LoadEngine(spec, progress).run()
