"""Services and process helpers for the deployment tests (workers, activation, HAProxy, reload).

Services here are imported by ``module:function`` in server subprocesses, so the
tests put this directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from support import ServerProcess, wait_for

from sockserve.service import Context


def whoami(request: bytes, ctx: Context) -> bytes:
    """Reply with the peer and local addresses the server believes in, and this process id."""
    peer = ctx.peer
    host, port = (peer[0], peer[1]) if isinstance(peer, tuple) else (str(peer), 0)
    local = ctx.local
    return f"{host} {port} {local.host or local.path} {local.port} {os.getpid()} {request.decode(errors='replace')}".encode()


def pid(request: bytes, ctx: Context) -> bytes:
    return f"{os.getpid()}".encode()


async def slow(request: bytes, ctx: Context) -> bytes:
    """Answer after the number of seconds the request names (a request in flight to drain)."""
    await asyncio.sleep(float(request.split()[0]))
    return b"done " + request


def upper(request: bytes, ctx: Context) -> bytes:
    return request.upper()


def lower(request: bytes, ctx: Context) -> bytes:
    return request.lower()


def request(addr: Any, data: bytes, timeout: float = 5.0, source: str | None = None) -> bytes:
    """One request on a fresh TCP (or Unix, for a str address) connection; the reply up to EOF or 4 KiB."""
    family = (
        socket.AF_UNIX
        if isinstance(addr, str)
        else (socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
    )
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if source is not None:
            s.bind((source, 0))
        s.connect(addr)
        s.sendall(data)
        return s.recv(4096)


def udp_request(addr: tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, addr)
        return s.recv(65536)


def serve_proc(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """``sockserve serve ARGS`` as the deployment tests run it: no wait at start (each test
    waits for the lines it needs, ``wait_endpoints(workers)``), and SIGTERM on exit so a
    supervisor reaps its workers."""
    return ServerProcess(*args, env=env, ready=0, graceful=True)


def readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


HAPROXY = "/usr/sbin/haproxy"


def haproxy_path() -> str | None:
    import shutil

    return shutil.which("haproxy") or (HAPROXY if os.path.exists(HAPROXY) else None)


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A bound, listening TCP socket on a free port, to hand to a peer (``bind fd@N``): no port race."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(128)
    s.set_inheritable(True)
    return s


class HAProxy(ServerProcess):
    """HAProxy in the foreground on a config written to ``workdir``; frontends get inherited fds."""

    def __init__(self, workdir: Path, config: str, fds: list[int]) -> None:
        exe = haproxy_path()
        assert exe is not None
        self.cfg = workdir / "haproxy.cfg"
        self.cfg.write_text(config)
        self.admin = workdir / "admin.sock"
        check = subprocess.run(
            [exe, "-c", "-f", str(self.cfg)], capture_output=True, timeout=20, pass_fds=fds
        )
        assert check.returncode == 0, check.stdout + check.stderr
        super().__init__(
            argv=[exe, "-db", "-f", str(self.cfg)], pass_fds=fds, ready=0, graceful=True
        )

    def command(self, cmd: str, timeout: float = 5.0) -> str:
        """Run one command on the admin socket (``show stat``, ``show servers state``...)."""
        wait_for(self.admin.exists, timeout, "haproxy admin socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.admin))
            s.sendall(cmd.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def server_status(self, backend: str, server: str) -> str:
        """UP, DOWN, ... of one server, from ``show stat`` (CSV)."""
        lines = self.command("show stat").splitlines()
        cols = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(cols, line.split(","), strict=False))
            if row.get("pxname") == backend and row.get("svname") == server:
                return row["status"]
        raise AssertionError(f"no server {backend}/{server} in show stat")


def boom(request: bytes, ctx: Context) -> bytes:
    """Raise on b'boom' (a handler error to count), echo otherwise."""
    if request.strip() == b"boom":
        raise RuntimeError("boom requested")
    return request


def scrape(url: str, timeout: float = 5.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET a Prometheus text page; samples keyed by (name, sorted labels)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def nap(request: bytes, ctx: Context) -> bytes:
    """A sync handler that blocks its worker's loop for ``sleep SECONDS``; replies its pid."""
    if request.startswith(b"sleep"):
        time.sleep(float(request.split()[1]))
    return f"{os.getpid()}".encode()


def threads_of(pid: int) -> int:
    """How many threads a process runs now (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/task"))
