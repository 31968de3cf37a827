"""``--workers``: processes sharing endpoints, restarted after SIGKILL, drained on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from deploy_helpers import addr_of, request, serve_proc


def pids_seen(addr: object, want: int, tries: int = 400) -> set[bytes]:
    """Distinct worker pids answering fresh connections (bounded tries)."""
    seen: set[bytes] = set()
    for _ in range(tries):
        seen.add(request(addr, b"?"))
        if len(seen) >= want:
            break
    return seen


def test_workers_share_endpoints_and_sigkilled_worker_is_replaced(tmp_path: Path) -> None:
    sock_path = str(tmp_path / "w.sock")
    with serve_proc(
        "deploy_helpers:pid",
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        f"unix://{sock_path}",
        "--workers",
        "2",
    ) as p:
        eps = p.endpoints(4)
        tcp = addr_of(next(e for e in eps if e.startswith("tcp")))
        # Both workers report the same port: one SO_REUSEPORT socket each, one reserved port.
        assert len({e for e in eps if e.startswith("tcp")}) == 1
        pids = pids_seen(tcp, 2)
        assert len(pids) == 2, pids  # the kernel spreads connections over both
        assert request(sock_path, b"?") in pids  # the inherited Unix socket, served by a worker
        victim = int(sorted(pids)[0])
        os.kill(victim, signal.SIGKILL)
        p.wait_log(rf"worker \d \(pid {victim}\) was killed by SIGKILL; restarting")
        p.wait_log(r"worker \d started \(pid \d+\)", count=3)
        p.endpoints(6)  # the new worker has bound its own socket too
        new_pids = pids_seen(tcp, 2)
        assert len(new_pids) == 2 and str(victim).encode() not in new_pids
        p.signal(signal.SIGTERM)
        assert p.wait() == 0
        assert not Path(sock_path).exists()  # the parent created it, the parent removed it


def test_sigterm_lets_every_worker_drain() -> None:
    with serve_proc("deploy_helpers:slow", "--listen", "tcp://127.0.0.1:0", "--workers", "2") as p:
        addr = addr_of(p.endpoints(2)[0])
        conns = []
        for _ in range(6):  # enough that, with two workers, both almost surely hold one
            c = socket.create_connection(addr, timeout=10)
            c.sendall(b"0.8 please")
            conns.append(c)
        p.wait_log(r"open from", count=6)
        p.signal(signal.SIGTERM)
        for c in conns:
            assert c.recv(100) == b"done 0.8 please"
            c.close()
        assert p.wait() == 0
        assert "draining 2 workers" in p.log
        assert p.log.count("exited with status 0") == 2


def test_workers_zero_means_one_per_cpu() -> None:
    with serve_proc("deploy_helpers:pid", "--listen", "tcp://127.0.0.1:0", "--workers", "0") as p:
        n = os.cpu_count() or 1
        p.wait_log(rf"starting {n} workers")
        p.endpoints(n)
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_sigint_is_forwarded_once_and_drains() -> None:
    with serve_proc("deploy_helpers:pid", "--listen", "tcp://127.0.0.1:0", "--workers", "2") as p:
        addr = addr_of(p.endpoints(2)[0])
        assert request(addr, b"?")
        p.signal(signal.SIGINT)
        assert p.wait() == 0
        assert p.log.count("SIGINT received: shutting down") == 2  # once per worker


def test_a_worker_that_cannot_bind_stops_the_supervisor() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with serve_proc(
            "deploy_helpers:pid", "--listen", f"tcp://127.0.0.1:{port}", "--workers", "2"
        ) as p:
            assert p.wait(20) == 1
            assert "address already in use" in p.log
            assert "could not start; stopping" in p.log
    finally:
        taken.close()


def test_unknown_service_is_a_usage_error_before_any_worker() -> None:
    with serve_proc("no_such_module:x", "--workers", "2") as p:
        assert p.wait() == 2
        assert "cannot import module 'no_such_module'" in p.log
        assert "worker" not in p.log


def test_restarted_workers_back_off() -> None:
    """A worker killed again and again soon after starting is restarted after longer pauses."""
    with serve_proc("deploy_helpers:pid", "--listen", "tcp://127.0.0.1:0", "--workers", "2") as p:
        p.endpoints(2)
        for i in range(3):
            victim = int(p.wait_log(r"worker 0 started \(pid (\d+)\)", count=i + 1)[i].group(1))
            os.kill(victim, signal.SIGKILL)
            p.wait_log(rf"worker 0 \(pid {victim}\) was killed by SIGKILL", timeout=15)
        p.wait_log(r"worker 0 started", count=4, timeout=15)
        delays = [float(m.group(1)) for m in p.wait_log(r"worker 0 .*restarting in ([\d.]+)s", 3)]
        assert delays == [0.1, 0.2, 0.4], delays
        p.signal(signal.SIGTERM)
        assert p.wait() == 0
