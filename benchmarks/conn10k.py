"""10,000 concurrent TCP connections, one request each: all answered? how much server memory? how fast?

Starts ``sockserve serve`` (core 0), then from this process (core 1) opens N
non-blocking connections, sends one 64-byte request on each as soon as it is
connected, and reads the reply, keeping every connection open until all are
answered. Reports the server's RSS growth per connection (measured while all N
are open), the time until all were connected and until all were answered, and
the kernel's listen-queue overflow counter (a full accept queue drops SYNs,
which the client only retries after a 1 s timeout).

Connects go out in batches, with completions handled between batches, as N
independent clients would interleave; nothing waits for the server on purpose.

    python benchmarks/conn10k.py [-n 10000] [--json]
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import select
import socket
import tempfile
import time
from pathlib import Path

from common import (
    LOAD_CORE,
    PYTHON,
    free_port,
    pin_self,
    rss_kib,
    server_process,
    wait_ready,
)

REQUEST = bytes(0x61 + i % 26 for i in range(64))
#: Connects issued between two passes over completions.
BATCH = 256


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        raise SystemExit(f"need {need} file descriptors but the hard limit is {hard}")
    return want


def listen_overflows() -> int:
    """TcpExt ListenOverflows: SYNs or ACKs dropped because an accept queue was full."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            return int(
                dict(zip(head.split()[1:], values.split()[1:], strict=True))["ListenOverflows"]
            )
    return 0


def drive(port: int, n: int, timeout: float) -> dict[str, float | int]:
    """Open n connections, one request each; return timings and counts (all sockets stay open)."""
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    connected = answered = failed = 0
    issued = 0
    t_connected = t_answered = 0.0
    t0 = time.perf_counter()
    deadline = t0 + timeout
    while answered + failed < n and time.perf_counter() < deadline:
        for _ in range(min(BATCH, n - issued)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                failed += 1
                s.close()
            else:
                socks[s.fileno()] = s
                ep.register(s.fileno(), select.EPOLLOUT)
            issued += 1
        for fd, ev in ep.poll(0 if issued < n else 0.05, 4096):
            s = socks[fd]
            if ev & select.EPOLLOUT:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                    ep.unregister(fd)
                    continue
                connected += 1
                if connected == n:
                    t_connected = time.perf_counter() - t0
                s.send(REQUEST)
                ep.modify(fd, select.EPOLLIN)
            else:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                ep.unregister(fd)
                if data:
                    answered += 1
                    if answered == n:
                        t_answered = time.perf_counter() - t0
                else:
                    failed += 1
    ep.close()
    drive.socks = socks  # type: ignore[attr-defined]  # kept open until measured
    return {
        "connected": connected,
        "answered": answered,
        "failed": failed,
        "connect_s": round(t_connected, 3) if connected == n else -1,
        "answer_s": round(t_answered, 3) if answered == n else -1,
    }


def run(n: int = 10_000, timeout: float = 30.0) -> dict[str, object]:
    raise_fd_limit(n + 200)  # inherited by the server process too
    port = free_port()
    log = Path(tempfile.gettempdir()) / "sockserve-bench-10k.log"
    cmd = [PYTHON, "-m", "sockserve", "serve", "timestamp"]  # defaults: info logs every connection
    cmd += ["--listen", f"tcp://127.0.0.1:{port}"]
    with server_process(cmd, log) as proc:
        wait_ready(port)
        pin_self(LOAD_CORE)
        time.sleep(0.5)  # let the server settle after the readiness probe
        before = rss_kib(proc.pid)
        overflows = listen_overflows()
        result = drive(port, n, timeout)
        after = rss_kib(proc.pid)
        result_all: dict[str, object] = dict(result)
        result_all.update(
            conns=n,
            rss_before_kib=before,
            rss_after_kib=after,
            bytes_per_conn=round((after - before) * 1024 / n),
            listen_overflows=listen_overflows() - overflows,
        )
        for s in drive.socks.values():  # type: ignore[attr-defined]
            s.close()
    return result_all


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=10_000, help="connections (default 10000)")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = run(args.n, args.timeout)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>16}: {v}")


if __name__ == "__main__":
    main()
