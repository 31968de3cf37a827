"""Measuring: one ``sockserve bench`` run against one server, and one round over all of them.

The machine is shared, so each run also measures how much CPU others took
(``foreign_cpu``) and is repeated when that was too much; and the server core's
busy time per request (``server_core_us``), which still compares servers when
the generator, not the server, is the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import (
    LOAD_CORE,
    PYTHON,
    SERVER_CORE,
    free_port,
    make_cert,
    pinned,
    server_process,
    wait_ready,
)
from workloads import Peer, Round, Workload


def bench_argv(
    url: str, conns: int, args: argparse.Namespace, framing: str = "raw", pipeline: int = 1
) -> list[str]:
    framed = ["--framing", framing, "--pipeline", str(pipeline)] if framing != "raw" else []
    if url.startswith("tls://"):  # the round's throwaway certificate (run_round)
        framed += ["--tls-ca", args.tls_ca]
    return [
        PYTHON,
        "-m",
        "sockserve",
        "bench",
        url,
        "-c",
        str(conns),
        "-d",
        f"{args.duration:g}",
        "--warmup",
        f"{args.warmup:g}",
        "-s",
        "64",
        "--json",
        "-q",
        *framed,
    ]


def run_bench(
    url: str,
    conns: int,
    args: argparse.Namespace,
    server_pid: int | None = None,
    framing: str = "raw",
    pipeline: int = 1,
) -> dict[str, object]:
    """One ``sockserve bench --json`` run, repeated while someone else used the CPUs.

    The machine is shared: a run during which other processes took more than
    ``--max-foreign`` of a core (all CPU time minus the server's and the
    generator's) is run again, up to ``--retries`` times, and the least
    disturbed attempt is kept. ``foreign_cpu`` in the result says how disturbed it was.
    """
    best: dict[str, object] | None = None
    for _ in range(args.retries + 1):
        res = _bench_once(bench_argv(url, conns, args, framing, pipeline), args, server_pid)
        if best is None or float(res["foreign_cpu"]) < float(best["foreign_cpu"]):  # type: ignore[arg-type]
            best = res
        if float(res["foreign_cpu"]) <= args.max_foreign:  # type: ignore[arg-type]
            break
    assert best is not None
    return best


def _bench_once(
    argv: list[str], args: argparse.Namespace, server_pid: int | None
) -> dict[str, object]:
    cmd = pinned(argv, LOAD_CORE)
    busy0, srv0, gen0, t0 = cpu_busy(), proc_cpu(server_pid), children_cpu(), time.monotonic()
    # The server core's busy time over a window inside the measured part of the run
    # (after start-up and warm-up, before the end): see server_core_us below.
    window = (t0 + args.warmup + 0.5, t0 + args.warmup + args.duration - 0.2)
    samples: list[tuple[float, float, float]] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            for at in window if window[1] - window[0] >= 0.5 else ():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(at - time.monotonic(), 0.0))
                if proc.poll() is not None:
                    break
                samples.append((time.monotonic(), core_busy(SERVER_CORE), proc_cpu(server_pid)))
            stdout, stderr = proc.communicate(timeout=args.duration * 4 + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    wall = time.monotonic() - t0
    gen = children_cpu() - gen0  # the generator (reaped by communicate); servers live on
    foreign = (cpu_busy() - busy0 - (proc_cpu(server_pid) - srv0) - gen) / wall
    if proc.returncode != 0 or not stdout.strip():
        data: dict[str, object] = {
            "failed": stderr.strip() or f"exit {proc.returncode}",
            "rps": 0.0,
        }
    else:
        data = json.loads(stdout)
    data["foreign_cpu"] = round(max(foreign, 0.0), 2)
    rps = float(data["rps"])  # type: ignore[arg-type]
    if len(samples) == 2 and rps > 0:
        (ta, ba, pa), (tb, bb, pb) = samples
        # Microseconds of core time per request: the server's own CPU plus the kernel's
        # network work done on its core (softirq), which is most of a loopback request.
        # It does not shrink when the generator, not the server, is the limit.
        data["server_core_us"] = round((bb - ba) / (tb - ta) / rps * 1e6, 3)
        data["server_core_busy"] = round((bb - ba) / (tb - ta), 3)
        # The server process's own CPU (user + system, its threads) per request: what it
        # spent, whoever else ran on its core meanwhile (softirq work on its behalf
        # done in other contexts is not in it). The steadiest figure on a busy machine.
        if server_pid is not None:
            data["server_cpu_us"] = round((pb - pa) / (tb - ta) / rps * 1e6, 3)
    return data


_HZ = os.sysconf("SC_CLK_TCK")


def cpu_busy() -> float:
    """CPU seconds all cores spent in processes, or stolen by the hypervisor (/proc/stat).

    Interrupt and softirq time is left out: loopback networking does its work
    there on behalf of the server and the generator, not of anyone else.
    """
    f = _stat_fields("cpu")
    return (f[0] + f[1] + f[2] + f[7]) / _HZ  # user, nice, system, steal


def core_busy(core: int) -> float:
    """CPU seconds one core spent on anything but idling: user, system, interrupts,
    softirq and steal (/proc/stat ``cpuN``)."""
    f = _stat_fields(f"cpu{core}")
    return (sum(f) - f[3] - f[4]) / _HZ if f else 0.0  # all but idle and iowait


def _stat_fields(name: str) -> list[int]:
    """The tick counters of one ``cpu``/``cpuN`` line of /proc/stat (empty if absent)."""
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            return [int(x) for x in fields[1:]]
    return []


def proc_cpu(pid: int | None) -> float:
    """User+system CPU seconds of a running process, all its threads (/proc/PID/stat)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _HZ


def children_cpu() -> float:
    """CPU seconds of every child reaped so far: read around one bench run, it gives that run's."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_round(
    rnd: int, peers: list[Peer], workloads: list[Workload], args: argparse.Namespace, tmp: Path
) -> Round:
    """One round: start every server afresh, then run each workload on each server in turn.

    All servers stay up for the round (an idle one costs nothing), so the runs
    being compared for one workload are seconds apart, not minutes: drift on a
    shared machine then hits both sides of a ratio alike. The order rotates
    with the round.
    """
    out: Round = {p.name: {} for p in peers}
    k = rnd % len(peers)
    order = peers[k:] + peers[:k]
    urls: dict[str, dict[str, str]] = {}
    pids: dict[str, int] = {}
    tls = any("{cert}" in a for peer in order for a in peer.argv)
    cert, key = make_cert(tmp) if tls else ("", "")
    args.tls_ca = cert
    with contextlib.ExitStack() as stack:
        for peer in order:
            port = free_port()
            unix = str(tmp / f"{peer.name}.sock")
            argv = [a.format(tcp=port, udp=port, unix=unix, cert=cert, key=key) for a in peer.argv]
            env = dict(peer.env) or None
            srv = stack.enter_context(server_process(argv, tmp / f"{peer.name}.log", env=env))
            pids[peer.name] = srv.pid
            urls[peer.name] = {
                "tcp": f"tcp://127.0.0.1:{port}",
                "tls": f"tls://127.0.0.1:{port}",
                "udp": f"udp://127.0.0.1:{port}",
                "unix": f"unix://{unix}",
            }
        for peer in order:
            has_unix = any(w.startswith("unix") for w in peer.workloads)
            wait_ready(
                int(urls[peer.name]["tcp"].rsplit(":", 1)[1]),
                urls[peer.name]["unix"][7:] if has_unix else None,
            )
        for w in workloads:
            for peer in order:
                if w.name not in peer.workloads:
                    continue
                url = urls[peer.name][w.scheme]
                res = run_bench(url, w.conns, args, pids[peer.name], w.framing, w.pipeline)
                out[peer.name][w.name] = res
                p99 = res.get("p99_us", 0)
                print(
                    f"  round {rnd + 1}  {w.name:<8} {peer.name:<13} "
                    f"{float(res['rps']):>10,.0f} req/s  p99 {p99} µs"  # type: ignore[arg-type]
                    f"  (others used {res['foreign_cpu']} CPU)"
                    + (f"  FAILED: {res['failed']}" if "failed" in res else ""),
                    flush=True,
                )
    return out


def yardstick_check(ydir: Path, args: argparse.Namespace) -> dict[str, object]:
    """``sockserve bench --procs 1`` against the C ``echobench`` on the C ``cecho`` server."""
    port = free_port()
    rows: dict[str, list[float]] = {"sockserve bench": [], "echobench": []}
    with server_process(
        [str(ydir / "cecho"), str(port), "-t"], Path(tempfile.gettempdir()) / "cecho.log"
    ):
        wait_ready(port)
        for _ in range(args.rounds):
            r = run_bench(f"tcp://127.0.0.1:{port}", 50, args)
            rows["sockserve bench"].append(float(r["rps"]))  # type: ignore[arg-type]
            cmd = [str(ydir / "echobench"), "-p", str(port), "-c", "50", "-s", "64", "-r", "91"]
            cmd += ["-d", f"{args.duration:g}", "-w", f"{args.warmup:g}"]
            line = subprocess.run(pinned(cmd, LOAD_CORE), capture_output=True, text=True).stdout
            fields = dict(f.split("=", 1) for f in line.split())
            rows["echobench"].append(float(fields["rps"]))
    ratios = [a / b for a, b in zip(rows["sockserve bench"], rows["echobench"], strict=True) if b]
    return {
        "sockserve_bench_rps": rows["sockserve bench"],
        "echobench_rps": rows["echobench"],
        "ratio": round(statistics.median(ratios), 2) if ratios else 0.0,
    }
