"""``--procs N``: fork N load processes, start them together, merge their histograms.

Why processes: one CPython process saturates one core long before a multi-core
server does; N forked engines each drive their share of the connections (and
of ``-n`` or ``--rate``) with no GIL between them. Histograms merge exactly,
since they are counters over the same buckets.

Workers connect first and report ready; the parent then releases them at once,
so no worker measures while others are still connecting. Live counters come
back through a shared anonymous mmap (no locks: each worker owns its slot and
the parent only reads, so a torn read costs one stale progress line at most);
the final result comes back as JSON on a pipe.

Error handling: a worker that cannot connect reports the ConnectError, which the
parent raises after stopping the others; a worker that dies without a result
raises :class:`~sockserve.errors.ClientError`.

Ctrl-C: workers ignore SIGINT (the terminal sends it to the whole group); the
parent asks each to stop with SIGUSR1, which ends its measured phase as Ctrl-C
ends a single engine's, then merges the partial results it sends back.

Resource handling: the parent always reaps every child (SIGTERM to the ones
left if it is interrupted).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import signal
import struct
import time
from dataclasses import replace

from ..errors import ClientError, ConnectError
from .engine import LoadEngine
from .spec import LoadResult, LoadSpec, Progress

_SLOT = struct.Struct("qqqd")  # answered, errors, timeouts, elapsed (-1 while warming up)
#: How often the parent refreshes the progress line while workers run.
PROGRESS_EVERY = 0.5


def split(spec: LoadSpec, procs: int) -> list[LoadSpec]:
    """Each worker's share: connections, ``-n`` requests and ``--rate`` divided evenly."""
    if procs < 1:
        raise ValueError("procs must be at least 1")
    if procs > spec.conns:
        raise ValueError(f"--procs {procs} needs at least {procs} connections, not {spec.conns}")
    shares = []
    for i in range(procs):
        conns = spec.conns // procs + (i < spec.conns % procs)
        requests = None
        if spec.requests is not None:
            requests = spec.requests // procs + (i < spec.requests % procs)
        rate = spec.rate * conns / spec.conns if spec.rate else None
        shares.append(replace(spec, conns=conns, requests=requests, rate=rate))
    return [s for s in shares if s.requests is None or s.requests > 0]


def run_procs(spec: LoadSpec, procs: int, progress: Progress | None = None) -> LoadResult:
    """Run ``spec`` over ``procs`` forked processes and return the merged result."""
    shares = split(spec, procs)
    shm = mmap.mmap(-1, _SLOT.size * len(shares))
    for i in range(len(shares)):
        _SLOT.pack_into(shm, i * _SLOT.size, 0, 0, 0, -1.0)  # "starting" until a worker reports
    go_r, go_w = os.pipe()
    children: list[tuple[int, int]] = []  # (pid, result pipe)
    try:
        for i, share in enumerate(shares):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                os.close(r)
                os.close(go_w)
                _child(share, i, shm, go_r, w)
            os.close(w)
            children.append((pid, r))
        os.close(go_r)
        go_r = -1
        state = _Collect(children)
        try:
            return _collect(state, shm, go_w, progress)
        except KeyboardInterrupt:
            for pid, _ in children:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGUSR1)
            merged = _collect(state, shm, go_w, None, deadline=time.monotonic() + STOP_GRACE)
            merged.interrupted = True
            return merged
    finally:
        for pid, r in children:
            with contextlib.suppress(OSError):
                os.close(r)
            _reap(pid)
        with contextlib.suppress(OSError):
            os.close(go_w)
        if go_r >= 0:
            os.close(go_r)
        shm.close()


def _child(
    spec: LoadSpec, slot: int, shm: mmap.mmap, go: int, out: int
) -> None:  # pragma: no cover
    """Worker body: connect, say ready, wait for the go, drive, send the result, exit."""
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop

        def stop(signum: int, frame: object) -> None:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # once: let the result go out
            raise KeyboardInterrupt

        signal.signal(signal.SIGUSR1, stop)

        def report(elapsed: float, done: int, errors: int, timeouts: int) -> None:
            _SLOT.pack_into(shm, slot * _SLOT.size, done, errors, timeouts, elapsed)

        engine = LoadEngine(spec, report)
        try:
            try:
                engine.connect()
            except ConnectError as exc:
                _send(out, {"connect_error": [exc.endpoint, exc.reason]})
                return
            _send(out, {"ready": True})
            os.read(go, 1)
            result = engine.drive()
        finally:
            engine.close()
        _send(out, {"result": result.to_dict()})
    except BaseException as exc:
        code = 1
        with contextlib.suppress(Exception):
            _send(out, {"failed": f"{type(exc).__name__}: {exc}"})
    finally:
        os._exit(code)


def _send(fd: int, msg: dict[str, object]) -> None:
    data = json.dumps(msg).encode() + b"\n"
    while data:
        data = data[os.write(fd, data) :]


class _Collect:
    """What the parent has gathered so far, kept across a Ctrl-C so collecting can resume."""

    def __init__(self, children: list[tuple[int, int]]) -> None:
        self.children = children
        self.bufs = {r: b"" for _, r in children}
        self.ready = 0
        self.released = False
        self.merged = LoadResult(conns=0)
        self.results = 0
        self.open_fds = set(self.bufs)


#: After Ctrl-C, how long workers get to send what they measured.
STOP_GRACE = 5.0


def _collect(
    state: _Collect,
    shm: mmap.mmap,
    go_w: int,
    progress: Progress | None,
    deadline: float | None = None,
) -> LoadResult:
    children = state.children
    bufs = state.bufs
    open_fds = state.open_fds
    merged = state.merged
    while open_fds:
        if deadline is not None and time.monotonic() > deadline:
            break
        rlist, _, _ = select.select(list(open_fds), [], [], PROGRESS_EVERY)
        for r in rlist:
            chunk = os.read(r, 65536)
            if not chunk:
                open_fds.discard(r)
                continue
            bufs[r] += chunk
            *lines, bufs[r] = bufs[r].split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if deadline is not None and "result" not in msg:
                    continue  # stopping: a worker interrupted before it measured
                if "connect_error" in msg:
                    endpoint, reason = msg["connect_error"]
                    raise ConnectError(endpoint, reason)
                if "failed" in msg:
                    raise ClientError("load worker", str(msg["failed"]))
                if "ready" in msg:
                    state.ready += 1
                if "result" in msg:
                    merged.merge(LoadResult.from_dict(msg["result"]))
                    state.results += 1
        if not state.released and state.ready == len(children) and deadline is None:
            os.write(go_w, b"g" * len(children))
            state.released = True
        if progress is not None and state.released:
            _progress(shm, len(children), progress)
    if deadline is not None:
        return merged  # after Ctrl-C: whatever came back in time
    if state.results != len(children):
        raise ClientError("load worker", "a load process exited without a result")
    return merged


def _progress(shm: mmap.mmap, n: int, progress: Progress) -> None:
    done = errors = timeouts = 0
    elapsed = 0.0
    warming = False
    for i in range(n):
        d, e, t, el = _SLOT.unpack_from(shm, i * _SLOT.size)
        done, errors, timeouts = done + d, errors + e, timeouts + t
        warming = warming or el < 0
        elapsed = max(elapsed, el)
    progress(-1.0 if warming else elapsed, done, errors, timeouts)


def _reap(pid: int) -> None:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    return
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass
