"""Issue 10, deployment: the metrics endpoint, metrics across workers, and SIGHUP reload.

Items 7 (metrics on the event loop), 8 (a slow worker's metrics channel), 13-15 (what a
reload keeps and applies), 16 (SIGHUP while starting). Real sockets on loopback and Unix
paths in tmp_path; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    SOCKSERVE,
    TESTS,
    Proc,
    addr_of,
    readable,
    request,
    sample,
    scrape,
    serve_proc,
    threads_of,
    wait_for,
)

# -- item 7: /metrics on the event loop --------------------------------------------------


def _http(addr: tuple[str, int], raw: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(raw)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def _read_responses(s: socket.socket, n: int) -> list[bytes]:
    """The heads of ``n`` HTTP responses (each with a content-length body) read from ``s``."""
    buf, heads = b"", list[bytes]()
    while len(heads) < n:
        if b"\r\n\r\n" in buf:
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            if len(rest) >= length:
                heads.append(head)
                buf = rest[length:]
                continue
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    return heads


@pytest.fixture
def metrics_http() -> Iterator[tuple[str, int]]:
    """The metrics HTTP server in this process: a short read timeout and room for 3 scrapers."""
    from sockserve.deploy.metrics import MetricsThread

    snap = [
        {
            "service": "t",
            "transport": "tcp",
            "requests": 5,
            "bytes_in": 0,
            "bytes_out": 0,
            "duration": 0.0,
            "buckets": [0] * 17,
            "errors": {},
            "connections": 0,
        }
    ]
    srv = MetricsThread("127.0.0.1:0", lambda: snap, read_timeout=0.5, max_conns=3)
    try:
        yield srv.http.address
    finally:
        srv.close()


def test_metrics_http_speaks_get_head_and_refuses_the_rest(metrics_http: tuple[str, int]) -> None:
    addr = metrics_http
    get = _http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert get.startswith(b"HTTP/1.1 200 ")
    assert b'sockserve_requests_total{service="t",transport="tcp"} 5.0' in get
    assert b"text/plain" in get.split(b"\r\n\r\n")[0]
    head = _http(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    h, _, body = head.partition(b"\r\n\r\n")
    assert h.startswith(b"HTTP/1.1 200 ") and b"content-length: " in h.lower() and body == b""
    assert _http(addr, b"GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 404 "
    )
    post = _http(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert post.startswith(b"HTTP/1.1 405 ") and b"allow: get, head" in post.lower()
    # Garbage (a TLS hello, a bare line): 400 and closed, and the server keeps serving.
    for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"hello\r\n\r\n"):
        assert _http(addr, junk).startswith(b"HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 40000 + b"\r\n\r\n"
    assert _http(addr, huge)[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400")
    # Pipelined requests on one keep-alive connection: answered in order.
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        first, second = _read_responses(s, 2)
        assert first.startswith(b"HTTP/1.1 200 ") and second.startswith(b"HTTP/1.1 404 ")


def test_metrics_http_closes_idle_and_slow_clients_and_caps_connections(
    metrics_http: tuple[str, int],
) -> None:
    addr = metrics_http
    idle = socket.create_connection(addr, timeout=5)
    slow = socket.create_connection(addr, timeout=5)
    slow.sendall(b"GET /met")  # never finishes its request
    for s in (idle, slow):
        assert readable(s, 5) and s.recv(100) == b""  # closed at the read timeout (0.5 s)
    # More idle connections than the cap: the longest-waiting is closed to let a scraper in.
    held = [socket.create_connection(addr, timeout=5) for _ in range(3)]
    time.sleep(0.05)  # not a readiness wait: gives the held ones an older wait time
    assert _http(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200 "
    )
    assert readable(held[0], 5) and held[0].recv(100) == b""
    for s in (idle, slow, *held):
        s.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_idle_metrics_connections_cost_no_thread(workers: str) -> None:
    """300 idle connections to --metrics: no thread each (302 before), scrapes still answered."""
    with serve_proc(
        "deploy_helpers:pid",
        "--listen",
        "tcp://127.0.0.1:0",
        "--workers",
        workers,
        "--metrics",
        "127.0.0.1:0",
    ) as p:
        tcp = addr_of(p.endpoints(int(workers))[0])
        url = p.wait_log(r"metrics on (\S+)")[0].group(1)
        assert request(tcp, b"?")
        before = threads_of(p.proc.pid)
        maddr = addr_of(url.removesuffix("/metrics").replace("http", "tcp", 1))
        idle = [socket.create_connection(maddr, timeout=5) for _ in range(300)]
        try:
            labels = {"service": "deploy_helpers:pid", "transport": "tcp"}
            assert sample(scrape(url), "sockserve_requests_total", **labels) == 1
            assert threads_of(p.proc.pid) <= before + 1  # +1: the supervisor's render thread
        finally:
            for s in idle:
                s.close()
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


# -- item 8: a slow or stopped worker keeps counting --------------------------------------


def test_a_busy_or_stopped_worker_keeps_its_metrics_channel() -> None:
    labels = {"service": "deploy_helpers:nap", "transport": "tcp"}
    with serve_proc(
        "deploy_helpers:nap",
        "--listen",
        "tcp://127.0.0.1:0",
        "--workers",
        "2",
        "--metrics",
        "127.0.0.1:0",
    ) as p:
        tcp = addr_of(p.endpoints(2)[0])
        url = p.wait_log(r"metrics on (\S+)")[0].group(1)
        pids = {request(tcp, b"?") for _ in range(40)}
        assert len(pids) == 2
        # A handler blocks one worker's loop for 3 s: its counts still come, at once.
        busy = threading.Thread(target=request, args=(tcp, b"sleep 3", 10))
        busy.start()
        wait_for(lambda: sample(scrape(url), "sockserve_connections", **labels) == 1, 5, "busy")
        started = time.monotonic()
        assert sample(scrape(url), "sockserve_requests_total", **labels) == 40
        assert time.monotonic() - started < 1.5  # not the 2 s wait for a late worker
        busy.join(10)
        # A worker that cannot answer at all (stopped) is late once, then counts again.
        victim = int(next(iter(pids)))
        os.kill(victim, signal.SIGSTOP)
        try:
            assert sample(scrape(url), "sockserve_requests_total", **labels) >= 40
        finally:
            os.kill(victim, signal.SIGCONT)
        for _ in range(200):
            request(tcp, b"?")
        wait_for(
            lambda: sample(scrape(url), "sockserve_requests_total", **labels) == 241,
            10,
            "every worker's requests counted (frozen at 107 of 200 before)",
        )
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


# -- items 13-15: reload ----------------------------------------------------------------


def _config(path: Path, body: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(body)
    tmp.replace(path)


def _reload(p: Proc, n: int) -> None:
    p.signal(signal.SIGHUP)
    p.wait_log(r"reloaded ", n)


def test_reload_changing_options_fails_no_request_keepalive_or_pipelined(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"

    def write(i: int) -> None:
        _config(
            cfg,
            f"""
[[service]]
name = "deploy_helpers:upper"
listen = ["tcp://127.0.0.1:0"]
idle_timeout = {60 + i}

[[service]]
name = "deploy_helpers:slow"
listen = ["tcp://127.0.0.2:0"]
framing = "line"
idle_timeout = {60 + i}
""",
        )

    write(0)
    with serve_proc("--config", str(cfg)) as p:
        up, slow = (addr_of(u) for u in p.endpoints(2))
        # Pipelined: three requests in one write to a slow handler, reloaded mid-way.
        piped = socket.create_connection(slow, timeout=10)
        piped.sendall(b"0.3 a\n0.3 b\n0.3 c\n")
        bench = subprocess.Popen(
            [*SOCKSERVE, "bench", f"tcp://{up[0]}:{up[1]}", "-c", "10", "-d", "3", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(0.5)  # not a readiness wait: lets bench get its connections going
            for i in range(1, 6):
                write(i)
                _reload(p, i)
            out, _ = bench.communicate(timeout=30)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.wait(5)
        report = json.loads(out)
        assert report["errors"] == 0, report  # 50 failed requests over 5 reloads before
        assert report["reconnects"] == 0, report
        got = b""
        while got.count(b"\n") < 3:
            chunk = piped.recv(100)
            assert chunk, got
            got += chunk
        assert got == b"done 0.3 a\ndone 0.3 b\ndone 0.3 c\n"
        piped.sendall(b"0 d\n")  # and the connection still serves
        assert piped.recv(100) == b"done 0 d\n"
        piped.close()
        assert p.log.count("open connections keep their settings") == 10
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_reload_applies_unix_mode_and_max_conns(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    path = tmp_path / "u.sock"

    def write(mode: str, max_conns: int) -> None:
        _config(
            cfg,
            f"""
[[service]]
name = "deploy_helpers:upper"
listen = ["unix://{path}"]
unix_mode = "{mode}"
max_conns = {max_conns}
""",
        )

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(str(path))
        return s

    write("666", 100)
    with serve_proc("--config", str(cfg)) as p:
        p.endpoints(1)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        write("600", 1)
        _reload(p, 1)
        assert "changed (max_conns, unix_mode)" in p.log
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # kept 0666 before
        first = connect()
        first.sendall(b"a")
        assert first.recv(10) == b"A"
        second = connect()  # queued in the backlog: the limit is now 1
        second.sendall(b"b")
        assert not readable(second, 0.5)
        write("600", 3)  # raised: the waiting client is accepted at once
        _reload(p, 2)
        assert readable(second, 5) and second.recv(10) == b"B"
        first.close()
        second.close()
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def _tls_conn(addr: tuple[str, int], ca: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=ca)
    return ctx.wrap_socket(socket.create_connection(addr, timeout=5), server_hostname="127.0.0.1")


def test_reload_with_an_unloadable_certificate_keeps_the_old_one_and_the_connections(
    tmp_path: Path, certs: Any
) -> None:
    cfg = tmp_path / "s.toml"
    cert = tmp_path / "server.pem"
    cert.write_bytes(Path(certs.server_cert).read_bytes())

    def write(cert_file: Path, idle: int) -> None:
        _config(
            cfg,
            f"""
[[service]]
name = "deploy_helpers:upper"
listen = ["tls://127.0.0.1:0"]
tls_cert = "{cert_file}"
tls_key = "{certs.server_key}"
idle_timeout = {idle}
""",
        )

    write(cert, 60)
    with serve_proc("--config", str(cfg)) as p:
        addr = addr_of(p.endpoints(1)[0])
        conns = [_tls_conn(addr, certs.ca) for _ in range(3)]
        for c in conns:
            c.sendall(b"x")
            assert c.recv(10) == b"X"
        # 1. Options changed to a certificate file that does not exist.
        missing = tmp_path / "missing.pem"
        write(missing, 61)
        p.signal(signal.SIGHUP)
        p.wait_log(rf"reload failed, still serving the previous configuration: .*{missing.name}")
        # 2. Same options, the certificate file itself broken (a bad renewal).
        write(cert, 60)
        cert.write_text("not a certificate\n")
        _reload(p, 1)
        p.wait_log(rf"keeping the certificate already loaded: .*{cert.name}")
        for c in conns:  # every open connection survives both (all closed before)
            c.sendall(b"y")
            assert c.recv(10) == b"Y"
        fresh = _tls_conn(addr, certs.ca)  # new handshakes: the old certificate
        fresh.sendall(b"z")
        assert fresh.recv(10) == b"Z"
        for c in (*conns, fresh):
            c.close()
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


# -- item 16: SIGHUP while starting ------------------------------------------------------


def test_sighup_early_in_start_up_never_kills_a_single_process(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    _config(cfg, '[[service]]\nname = "deploy_helpers:upper"\nlisten = ["tcp://127.0.0.1:0"]\n')
    env = {**os.environ, "PYTHONPATH": TESTS}
    for _ in range(3):
        proc = subprocess.Popen(
            [*SOCKSERVE, "serve", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        time.sleep(0.05)  # the figure: 50 ms after start, while importing
        proc.send_signal(signal.SIGHUP)
        try:
            assert proc.stderr is not None
            lines = []
            for raw in proc.stderr:
                lines.append(raw.decode())
                if "reloaded" in lines[-1]:
                    break
            assert any("reloaded" in line for line in lines), "".join(lines)  # queued, done
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=15)
        assert proc.returncode == 0


def test_sighup_storm_while_workers_start_kills_none(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"
    _config(cfg, '[[service]]\nname = "deploy_helpers:upper"\nlisten = ["tcp://127.0.0.1:0"]\n')
    with serve_proc("--config", str(cfg), "--workers", "2") as p:
        p.wait_log(r"supervisor \(pid \d+\) starting")
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            p.signal(signal.SIGHUP)
            time.sleep(0.03)  # the rhythm: SIGHUPs 30 ms apart
        up = addr_of(p.endpoints(2)[0])
        assert request(up, b"ok") == b"OK"
        p.wait_log(r"reloaded ", 2)
        assert "killed by SIGHUP" not in p.log
        assert p.log.count("worker 0 started") == 1 and p.log.count("worker 1 started") == 1
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_reload_that_denies_an_open_connection_answers_it_first(tmp_path: Path) -> None:
    cfg = tmp_path / "s.toml"

    def write(allow: str) -> None:
        _config(
            cfg,
            f"""
[[service]]
name = "deploy_helpers:slow"
listen = ["tcp://127.0.0.1:0"]
framing = "line"
allow = [{allow}]
""",
        )

    write('"127.0.0.0/8"')
    with serve_proc("--config", str(cfg)) as p:
        addr = addr_of(p.endpoints(1)[0])
        held = socket.create_connection(addr, timeout=10)
        held.sendall(b"0.5 a\n0.2 b\n")  # sent before the reload: both are answered
        write('"10.0.0.0/8"')
        _reload(p, 1)
        got = b""
        while chunk := held.recv(100):
            got += chunk
        assert got == b"done 0.5 a\ndone 0.2 b\n"  # then closed: the new rules refuse it
        held.close()
        p.wait_log("denied by the reloaded allow/deny rules")
        # New connections: refused at accept (closed, or reset as the request lands).
        with contextlib.suppress(ConnectionResetError):
            assert request(addr, b"0 c\n") == b""
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


@pytest.mark.parametrize("engine", ["auto", "asyncio"])
@pytest.mark.parametrize("how", ["reload", "sigterm"])
def test_draining_answers_every_pipelined_request_first(
    tmp_path: Path, engine: str, how: str
) -> None:
    """Requests read but not yet handed to the handler (pipelined past the queue) are answered."""
    cfg = tmp_path / "s.toml"

    def write(allow: str) -> None:
        _config(
            cfg,
            f"""
[[service]]
name = "deploy_helpers:slow"
listen = ["tcp://127.0.0.1:0"]
framing = "line"
allow = ["{allow}"]
""",
        )

    write("127.0.0.0/8")
    n = 400
    with serve_proc("--config", str(cfg), "--engine", engine) as p:
        addr = addr_of(p.endpoints(1)[0])
        held = socket.create_connection(addr, timeout=10)
        held.sendall(b"".join(b"0.002 %d\n" % i for i in range(n)))
        got = held.recv(100)  # the first replies: the rest are queued or in the buffer
        if how == "reload":
            write("10.0.0.0/8")
            p.signal(signal.SIGHUP)
        else:
            p.signal(signal.SIGTERM)
        while chunk := held.recv(65536):
            got += chunk
        held.close()
        assert got.count(b"\n") == n  # 64 of 400 before: the rest were dropped
        assert got.endswith(b"done 0.002 %d\n" % (n - 1))
        if how == "sigterm":
            assert p.wait() == 0
