"""The relay against socat and HAProxy: request/response through it, and bulk one way.

    python benchmarks/relay.py [--rounds 3] [--duration 5] [--conns 50] [--bulk-mib 1024]

Each relay runs pinned to core 0; what is behind it (the timestamp server, or a discard
server for bulk) and the load (``sockserve bench``, or this script's ``--send`` child)
on core 1. Request/response: 64-byte requests on ``--conns`` connections, the rate
``sockserve bench`` reports. Bulk: ``--bulk-mib`` MiB sent one way on one connection,
timed from connect until the FIN comes back (the discard server closes on EOF, so every
byte has crossed). The relays take turns within a round and the order flips each round;
the figures are medians over rounds, the ratios those of the medians.

Relays: ``sockserve`` (``sockserve relay LISTEN TARGET``: the pump), ``sockserve-splice0``
(the pump without splice, ``SOCKSERVE_RELAY_SPLICE=0``), ``sockserve-session`` (asyncio
transports, ``SOCKSERVE_RELAY_PUMP=0``), ``socat`` (``TCP-LISTEN:P,fork,reuseaddr
TCP:127.0.0.1:Q``) and ``haproxy`` (``mode tcp``, one thread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import LOAD_CORE, PYTHON, SERVER_CORE, free_port, pinned, server_process, wait_ready
from measure import run_bench

HAPROXY_CFG = """global
    nbthread 1
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend relay
    bind 127.0.0.1:{port}
    default_backend target
backend target
    server s1 127.0.0.1:{target}
"""
RELAYS = ("sockserve", "sockserve-splice0", "sockserve-session", "socat", "haproxy")


def relay_cmd(name: str, port: int, target: int, work: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if name.startswith("sockserve"):
        env["SOCKSERVE_RELAY_SPLICE"] = "0" if name == "sockserve-splice0" else "1"
        env["SOCKSERVE_RELAY_PUMP"] = "0" if name == "sockserve-session" else "1"
        listen, to = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{target}"
        return [PYTHON, "-m", "sockserve", "relay", listen, to, "-q", "--no-access-log"], env
    if name == "socat":
        return ["socat", f"TCP-LISTEN:{port},fork,reuseaddr", f"TCP:127.0.0.1:{target}"], env
    cfg = work / f"haproxy-{port}.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, target=target))
    return ["haproxy", "-db", "-f", str(cfg)], env


@contextlib.contextmanager
def started(cmd: list[str], env: dict[str, str], core: int, port: int, log: Path) -> Iterator[int]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(pinned(cmd, core), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(port)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def send(port: int, total: int) -> float:
    """The bulk sender (``--send``): seconds from connect to the FIN coming back."""
    chunk = b"\x00" * (1 << 20)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        left = total
        while left > 0:
            s.sendall(chunk if left >= len(chunk) else chunk[:left])
            left -= len(chunk)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    return time.perf_counter() - start


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its reaped children (socat forks one per connection)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def bulk_once(port: int, total: int, pid: int) -> tuple[float, float]:
    """Seconds for ``total`` bytes through the relay, and the relay's CPU seconds."""
    cmd = pinned([PYTHON, __file__, "--send", str(port), str(total)], LOAD_CORE)
    cpu = tree_cpu(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    time.sleep(0.2)  # socat's child for the connection is reaped
    return float(out.stdout.strip()), tree_cpu(pid) - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--bulk-mib", type=int, default=1024)
    ap.add_argument(
        "--relays", default=",".join(RELAYS), help="comma-separated, of " + ", ".join(RELAYS)
    )
    ap.add_argument("--only", choices=["rr", "bulk"], help="one workload only")
    ap.add_argument("--json", type=Path, help="write the results here too")
    ap.add_argument("--send", nargs=2, type=int, metavar=("PORT", "BYTES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.send:
        print(f"{send(*args.send):.4f}")
        return
    args.retries, args.max_foreign = 0, 99.0  # the target shares core 1: foreign by design
    relays = [r for r in args.relays.split(",") if r]
    for r in relays:
        if r not in RELAYS:
            sys.exit(f"relay.py: unknown relay {r!r}; known: {', '.join(RELAYS)}")
        if r in ("socat", "haproxy") and shutil.which(r) is None:
            sys.exit(f"relay.py: {r} is not installed (apt-get install {r})")
    results: dict[str, dict[str, list[float]]] = {
        "rr": {},
        "rr_cpu": {},
        "bulk": {},
        "bulk_cpu": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log = work / "servers.log"
        ts, sink = free_port(), free_port()
        serve = [PYTHON, "-m", "sockserve", "serve", "-q", "--no-access-log"]
        with (
            server_process([*serve, "-l", f"tcp://127.0.0.1:{ts}"], log, LOAD_CORE),
            server_process([*serve, "-l", f"tcp://127.0.0.1:{sink}", "discard"], log, LOAD_CORE),
        ):
            wait_ready(ts)
            wait_ready(sink)
            for rnd in range(args.rounds):
                order = relays if rnd % 2 == 0 else relays[::-1]
                for name in order:
                    for kind in ("rr", "bulk"):
                        if args.only and kind != args.only:
                            continue
                        port = free_port()
                        cmd, env = relay_cmd(name, port, ts if kind == "rr" else sink, work)
                        with started(cmd, env, SERVER_CORE, port, log) as pid:
                            if kind == "rr":
                                cpu = tree_cpu(pid)
                                res = run_bench(f"tcp://127.0.0.1:{port}", args.conns, args, pid)
                                value = float(res["rps"])  # type: ignore[arg-type]
                                cpu = tree_cpu(pid) - cpu
                                reqs = value * (args.duration + args.warmup)
                                us = cpu / reqs * 1e6 if reqs else 0.0
                                results["rr_cpu"].setdefault(name, []).append(us)
                            else:
                                secs, cpu = bulk_once(port, args.bulk_mib << 20, pid)
                                value = (args.bulk_mib << 20) / secs / 1e6
                                gib = args.bulk_mib / 1024
                                results["bulk_cpu"].setdefault(name, []).append(cpu / gib)
                        results[kind].setdefault(name, []).append(value)
                        unit = "req/s" if kind == "rr" else "MB/s"
                        print(
                            f"round {rnd + 1} {kind:4} {name:18} {value:12,.0f} {unit}", flush=True
                        )
    report(results, relays)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def report(results: dict[str, dict[str, list[float]]], relays: list[str]) -> None:
    for kind, unit in (
        ("rr", "req/s"),
        ("rr_cpu", "relay CPU us/request, about"),
        ("bulk", "MB/s"),
        ("bulk_cpu", "relay CPU s/GiB"),
    ):
        rows = results[kind]
        if not rows:
            continue
        med = {name: statistics.median(v) for name, v in rows.items()}
        ours = med.get("sockserve")
        cpu = kind.endswith("_cpu")
        what = "relay / sockserve" if cpu else "sockserve / relay"
        print(f"\n{kind}: median {unit} (ratio {what})")
        for name in relays:
            if name in med:
                ratio = f"{ours / med[name]:.2f}x" if ours and med[name] else "-"
                if cpu and ours and med[name]:
                    ratio = f"{med[name] / ours:.2f}x"
                fmt = ",.2f" if cpu else ",.0f"
                print(f"  {name:18} {med[name]:12{fmt}}  {ratio}")


if __name__ == "__main__":
    main()
