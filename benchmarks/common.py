"""Helpers the benchmark scripts share: free ports, pinned server processes, readiness, machine facts.

The benchmarks are programs, not tests: they start real processes pinned with
``taskset`` (server on core 0, load on core 1) so the two never fight for a CPU.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
PYTHON = sys.executable
SERVER_CORE = 0
LOAD_CORE = 1


def free_port() -> int:
    """A TCP and UDP port that is free right now on 127.0.0.1 (for the next server)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def pinned(cmd: Sequence[str], core: int) -> list[str]:
    """``cmd`` run on one core with taskset, or as is where taskset or the core is missing."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > core:
        return ["taskset", "-c", str(core), *cmd]
    return list(cmd)


def pin_self(core: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {core})


def wait_ready(
    tcp_port: int | None = None, unix_path: str | None = None, timeout: float = 15
) -> None:
    """Wait until the server accepts on its stream endpoints (UDP is checked by the bench probe)."""
    deadline = time.monotonic() + timeout
    targets: list[tuple[int, object]] = []
    if tcp_port:
        targets.append((socket.AF_INET, ("127.0.0.1", tcp_port)))
    if unix_path:
        targets.append((socket.AF_UNIX, unix_path))
    for family, addr in targets:
        while True:
            try:
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(1)
                    s.connect(addr)  # type: ignore[arg-type]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server did not come up on {addr}") from None
                time.sleep(0.05)


@contextlib.contextmanager
def server_process(
    cmd: Sequence[str], log: Path, core: int = SERVER_CORE, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` pinned to ``core``, logging to ``log``, with ``env`` on top of this
    process's environment; stop it (TERM, then KILL) on exit."""
    full = {**os.environ, **env} if env else None
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            pinned(cmd, core), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=full
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def make_cert(d: Path) -> tuple[str, str]:
    """A self-signed P-256 certificate for 127.0.0.1 / localhost in ``d`` (the openssl CLI):
    the TLS benchmarks' server certificate, and the CA their clients verify it with."""
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"),
            *("ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine() -> dict[str, str]:
    """What the numbers were measured on, for the report."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.0f} GiB"
    versions = {}
    for mod in ("uvloop", "gevent", "twisted"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "not installed"
    version = subprocess.run(
        [PYTHON, "-m", "sockserve", "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    return {
        "sockserve": _revision(),
        "build": version or "unknown",
        "cpu": f"{cpu} x {os.cpu_count()} cores",
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "pinning": "taskset: server on core 0, load on core 1"
        if shutil.which("taskset")
        else "none (taskset missing)",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _revision() -> str:
    """The commit measured, and whether the working tree had changes on top of it."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown revision"
    return (
        f"commit {rev}" + (" + uncommitted changes in src/" if dirty else "") if rev else "unknown"
    )


def old_checkout(commit: str, dest: Path) -> tuple[Path, str]:
    """``commit``'s sockserve, C helper included, installed (``pip install --target``)
    from a temporary worktree into ``dest``, so ``PYTHONPATH=dest`` runs that commit with
    this Python and these libraries: the folder and the short commit id."""
    git = ["git", "-C", str(ROOT)]
    rev = subprocess.run(
        [*git, "rev-parse", "--short", commit], capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = dest.with_name(dest.name + "-tree")
    subprocess.run([*git, "worktree", "add", "-q", "--detach", str(tree), commit], check=True)
    try:
        subprocess.run(
            [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", str(dest), str(tree)],
            check=True,
            env={**os.environ, "SOCKSERVE_REQUIRE_SPEEDUPS": "1"},
        )
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)
    return dest, rev
