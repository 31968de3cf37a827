"""The benchmark suite: sockserve against the servers people would otherwise write, one command.

    python benchmarks/run.py                 # the full run (about 10 minutes), writes docs/benchmarks.md
    python benchmarks/run.py --quick         # 1 round of 1 s: a smoke test of the suite itself

Every server runs the timestamp service (64-byte request, 91-byte reply) on TCP,
a Unix stream socket and UDP, pinned to core 0; ``sockserve bench`` drives it
from core 1. Rounds alternate the servers (round 2 runs them in another order)
so drift on a noisy machine spreads over all of them; the report gives the
median of the rounds, and goal ratios are medians of per-round ratios, each
taken from the same round.

Outputs: ``docs/benchmarks.md`` (tables, machine, command), ``docs/benchmarks.png``
(requests/s and p99 per server and workload) and ``benchmarks/results.json``
(every round's raw ``sockserve bench --json`` object).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import conn10k
import startup
from common import (
    LOAD_CORE,
    PEERS,
    PYTHON,
    ROOT,
    SERVER_CORE,
    free_port,
    machine,
    pinned,
    server_process,
    wait_ready,
)


@dataclass(frozen=True)
class Workload:
    name: str
    scheme: str  # tcp | unix | udp
    conns: int


WORKLOADS = [
    Workload("tcp-50", "tcp", 50),
    Workload("tcp-1", "tcp", 1),
    Workload("unix-50", "unix", 50),
    Workload("unix-1", "unix", 1),
    Workload("udp-50", "udp", 50),
]


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    argv: tuple[str, ...]  # {tcp} {udp} {unix} are filled in
    workloads: tuple[str, ...] = tuple(w.name for w in WORKLOADS)


_PEER_ARGS = ("--tcp", "{tcp}", "--udp", "{udp}", "--unix", "{unix}")
PEERS_ALL = [
    Peer(
        "sockserve",
        "sockserve (uvloop)",
        (
            *(PYTHON, "-m", "sockserve", "serve", "timestamp"),
            *("--listen", "tcp://127.0.0.1:{tcp}", "--listen", "udp://127.0.0.1:{udp}"),
            *("--listen", "unix://{unix}"),
        ),
    ),
    Peer("uvloop", "uvloop Protocol", (PYTHON, str(PEERS / "uvloop_protocol.py"), *_PEER_ARGS)),
    Peer("asyncio", "asyncio Protocol", (PYTHON, str(PEERS / "asyncio_protocol.py"), *_PEER_ARGS)),
    Peer("gevent", "gevent StreamServer", (PYTHON, str(PEERS / "gevent_server.py"), *_PEER_ARGS)),
    Peer(
        "socketserver",
        "socketserver threads",
        (PYTHON, str(PEERS / "socketserver_threads.py"), *_PEER_ARGS),
    ),
    Peer("twisted", "Twisted", (PYTHON, str(PEERS / "twisted_server.py"), *_PEER_ARGS)),
    Peer(
        "blocking",
        "textbook blocking loop",
        (PYTHON, str(PEERS / "blocking_loop.py"), *_PEER_ARGS),
        # One client at a time by construction: 50 stream connections would just wait.
        ("tcp-1", "unix-1", "udp-50"),
    ),
]

#: The issue's goals: (workload, sockserve must reach at least this ratio, against this peer).
GOALS = [
    ("tcp-50", 1.1, "uvloop"),
    ("tcp-1", 1.1, "uvloop"),
    ("unix-50", 1.1, "uvloop"),
    ("unix-1", 1.1, "uvloop"),
    ("udp-50", 1.1, "blocking"),
]


def bench_argv(url: str, conns: int, args: argparse.Namespace) -> list[str]:
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
    ]


def run_bench(
    url: str, conns: int, args: argparse.Namespace, server_pid: int | None = None
) -> dict[str, object]:
    """One ``sockserve bench --json`` run, repeated while someone else used the CPUs.

    The machine is shared: a run during which other processes took more than
    ``--max-foreign`` of a core (all CPU time minus the server's and the
    generator's) is run again, up to ``--retries`` times, and the least
    disturbed attempt is kept. ``foreign_cpu`` in the result says how disturbed it was.
    """
    best: dict[str, object] | None = None
    for _ in range(args.retries + 1):
        res = _bench_once(url, conns, args, server_pid)
        if best is None or float(res["foreign_cpu"]) < float(best["foreign_cpu"]):  # type: ignore[arg-type]
            best = res
        if float(res["foreign_cpu"]) <= args.max_foreign:  # type: ignore[arg-type]
            break
    assert best is not None
    return best


def _bench_once(
    url: str, conns: int, args: argparse.Namespace, server_pid: int | None
) -> dict[str, object]:
    cmd = pinned(bench_argv(url, conns, args), LOAD_CORE)
    busy0, srv0, gen0, t0 = cpu_busy(), proc_cpu(server_pid), children_cpu(), time.monotonic()
    # The server core's busy time over a window inside the measured part of the run
    # (after start-up and warm-up, before the end): see server_core_us below.
    window = (t0 + args.warmup + 0.5, t0 + args.warmup + args.duration - 0.2)
    samples: list[tuple[float, float]] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            for at in window if window[1] - window[0] >= 0.5 else ():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(at - time.monotonic(), 0.0))
                if proc.poll() is not None:
                    break
                samples.append((time.monotonic(), core_busy(SERVER_CORE)))
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
        (ta, ba), (tb, bb) = samples
        # Microseconds of core time per request: the server's own CPU plus the kernel's
        # network work done on its core (softirq), which is most of a loopback request.
        # It does not shrink when the generator, not the server, is the limit.
        data["server_core_us"] = round((bb - ba) / (tb - ta) / rps * 1e6, 3)
        data["server_core_busy"] = round((bb - ba) / (tb - ta), 3)
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
) -> dict[str, dict[str, dict[str, object]]]:
    """One round: start every server afresh, then run each workload on each server in turn.

    All servers stay up for the round (an idle one costs nothing), so the runs
    being compared for one workload are seconds apart, not minutes: drift on a
    shared machine then hits both sides of a ratio alike. The order rotates
    with the round.
    """
    out: dict[str, dict[str, dict[str, object]]] = {p.name: {} for p in peers}
    k = rnd % len(peers)
    order = peers[k:] + peers[:k]
    urls: dict[str, dict[str, str]] = {}
    pids: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        for peer in order:
            port = free_port()
            unix = str(tmp / f"{peer.name}.sock")
            argv = [a.format(tcp=port, udp=port, unix=unix) for a in peer.argv]
            srv = stack.enter_context(server_process(argv, tmp / f"{peer.name}.log"))
            pids[peer.name] = srv.pid
            urls[peer.name] = {
                "tcp": f"tcp://127.0.0.1:{port}",
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
                res = run_bench(urls[peer.name][w.scheme], w.conns, args, pids[peer.name])
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


def c_reference(ydir: Path) -> Peer:
    """The C yardstick ``cecho -t`` as a reference row: what one core does with no
    interpreter at all (TCP and UDP on one port; no Unix sockets)."""
    return Peer(
        "cecho",
        "C epoll server (yardstick)",
        (str(ydir / "cecho"), "{tcp}", "-t"),
        ("tcp-50", "tcp-1", "udp-50"),
    )


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


# -- summarising -------------------------------------------------------------------------


def median_of(
    rounds: list[dict[str, dict[str, dict[str, object]]]], peer: str, wl: str, key: str
) -> float | None:
    vals = [float(r[peer][wl][key]) for r in rounds if wl in r.get(peer, {}) and key in r[peer][wl]]  # type: ignore[arg-type]
    return statistics.median(vals) if vals else None


def goal_ratio(
    rounds: list[dict[str, dict[str, dict[str, object]]]], wl: str, base: str
) -> tuple[float, list[float]] | None:
    ratios = []
    for r in rounds:
        a = r.get("sockserve", {}).get(wl, {}).get("rps")
        b = r.get(base, {}).get(wl, {}).get("rps")
        if a and b:
            ratios.append(float(a) / float(b))  # type: ignore[arg-type]
    return (statistics.median(ratios), ratios) if ratios else None


#: A server core at least this busy was the limit; below it, the server waited on the
#: generator (or, with one connection, on the client's round trip).
SATURATED = 0.9


def capacity_ratio(
    rounds: list[dict[str, dict[str, dict[str, object]]]], wl: str, base: str
) -> tuple[float, list[float]] | None:
    """Per-round ratios of core time per request (base over sockserve): the speed-up a
    generator with room to spare would show. Only rounds where both server cores were
    saturated count: an idle core's time per request measures waiting (and sockserve's
    busy-poll fills such waits), not work."""
    ratios = []
    for r in rounds:
        a, b = r.get("sockserve", {}).get(wl, {}), r.get(base, {}).get(wl, {})
        saturated = all(float(x.get("server_core_busy", 0)) >= SATURATED for x in (a, b))  # type: ignore[arg-type]
        if saturated and a.get("server_core_us") and b.get("server_core_us"):
            ratios.append(float(b["server_core_us"]) / float(a["server_core_us"]))  # type: ignore[arg-type]
    return (statistics.median(ratios), ratios) if ratios else None


def best_of(rounds: list[dict[str, dict[str, dict[str, object]]]], peer: str, wl: str) -> float:
    """Highest requests/s of the rounds: interference only ever slows a run down."""
    vals = [float(r[peer][wl]["rps"]) for r in rounds if wl in r.get(peer, {})]  # type: ignore[arg-type]
    return max(vals, default=0.0)


def table(
    peers: list[Peer], workloads: list[Workload], cell: Callable[[str, str], str]
) -> list[str]:
    """A markdown table: a row per server, a column per workload, ``cell(peer, workload)``."""
    rows = ["| server | " + " | ".join(w.name for w in workloads) + " |"]
    rows.append("|---" * (len(workloads) + 1) + "|")
    for p in peers:
        rows.append(f"| {p.label} | " + " | ".join(cell(p.name, w.name) for w in workloads) + " |")
    return rows


def fmt_rps(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fmt_us(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f} µs" if v < 10_000 else f"{v / 1000:,.1f} ms"


def plot(
    rounds: list[dict[str, dict[str, dict[str, object]]]],
    peers: list[Peer],
    workloads: list[Workload],
    path: Path,
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    width = 0.8 / len(peers)
    xs = range(len(workloads))
    for i, peer in enumerate(peers):
        rps = [median_of(rounds, peer.name, w.name, "rps") or 0 for w in workloads]
        p99 = [median_of(rounds, peer.name, w.name, "p99_us") or 0 for w in workloads]
        pos = [x + (i - (len(peers) - 1) / 2) * width for x in xs]
        ax1.bar(pos, [v / 1000 for v in rps], width, label=peer.label)
        ax2.bar(pos, [v / 1000 for v in p99], width, label=peer.label)
    ax1.set_ylabel("requests/s (thousands)")
    ax1.set_title("Timestamp service, 64-byte requests: median of rounds (higher is better)")
    ax2.set_ylabel("p99 latency (ms, log)")
    ax2.set_yscale("log")
    ax2.set_title("p99 latency, closed loop (lower is better)")
    ax2.set_xticks(
        list(xs), [f"{w.scheme}, {w.conns} conn{'s' * (w.conns > 1)}" for w in workloads]
    )
    ax1.set_ylim(top=ax1.get_ylim()[1] * 1.2)  # room for the legend above the bars
    ax1.legend(ncol=4, fontsize=8, loc="upper right")
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _foreign(rounds: list[dict[str, dict[str, dict[str, object]]]]) -> list[float]:
    return [
        float(res.get("foreign_cpu", 0.0))
        for r in rounds
        for ws in r.values()
        for res in ws.values()
    ]  # type: ignore[arg-type]


def worst_foreign(rounds: list[dict[str, dict[str, dict[str, object]]]]) -> float:
    return max(_foreign(rounds), default=0.0)


def median_foreign(rounds: list[dict[str, dict[str, dict[str, object]]]]) -> float:
    vals = _foreign(rounds)
    return statistics.median(vals) if vals else 0.0


def write_report(
    rounds: list[dict[str, dict[str, dict[str, object]]]],
    peers: list[Peer],
    workloads: list[Workload],
    args: argparse.Namespace,
    extras: dict[str, object],
    command: str,
    png: str | None,
) -> str:
    m = machine()
    lines = [
        "# Benchmarks",
        "",
        "sockserve's server against the servers Python users write by hand, all running the",
        "timestamp service (`[<ctime>] <message>`: a 64-byte request gets a 91-byte reply),",
        "driven by `sockserve bench`. Generated by `benchmarks/run.py`; do not edit by hand.",
        "",
        "Rerun:",
        "",
        "```sh",
        ".venv/bin/pip install -e '.[bench]'",
        command,
        "```",
        "",
        "## Machine and method",
        "",
        *[f"- **{k}**: {v}" for k, v in m.items()],
        f"- **method**: {args.rounds} round{'s' * (args.rounds != 1)} x {args.duration:g} s measured after {args.warmup:g} s"
        " warm-up per server and workload; each round starts every server afresh and runs each"
        " workload on every server back to back (the order rotates per round), so the two sides"
        " of a ratio are measured seconds apart; closed loop, 64-byte requests; the figures are"
        " medians of the rounds, ratios medians of per-round ratios.",
        f"- **disturbance**: a run during which other processes used more than {args.max_foreign:g}"
        f" of a core is rerun (up to {args.retries} times) and the least disturbed kept; the kept"
        f" runs saw at most {worst_foreign(rounds):.2f} cores of foreign load (median"
        f' {median_foreign(rounds):.2f}). Ratios list every round so the spread shows; "best'
        " runs\" compares each server's fastest round, since interference only slows a run.",
        "- sockserve runs with its defaults (raw framing, limits on, `info` logging of every connection).",
        "- The machine is shared and noisy: compare servers within this table, not with numbers",
        "  measured elsewhere, and expect a few percent of drift between runs.",
        "- A server that comes close to what the generator itself can drive (see *Load generator",
        "  check*) is partly measuring the generator: ratios between such servers shrink toward 1.",
        "",
        "## Goals (issue 4)",
        "",
        "Throughput is the goal's measure. *Core time* compares the server core's busy time",
        "per request (CPU of the server and the kernel's network work on its core), which",
        "shows the speed-up a generator with room to spare would see: where the server core",
        "stays below 100% busy, the generator was the limit and the throughput ratio is",
        "compressed toward 1. It is given only where both servers kept their core busy: with",
        "one connection each server mostly waits for the client, and sockserve busy-polls",
        "through that wait.",
        "",
        "| goal | throughput | core time per request | target | met (throughput) |",
        "|---|---|---|---|---|",
    ]
    labels = {p.name: p.label for p in peers}
    for wl, target, base in GOALS:
        if not any(w.name == wl for w in workloads):
            continue
        got = goal_ratio(rounds, wl, base)
        if got is None:
            continue
        ratio, each = got
        per = ", ".join(f"{r:.2f}" for r in each)
        best_a, best_b = best_of(rounds, "sockserve", wl), best_of(rounds, base, wl)
        best = f"; best runs {best_a / best_b:.2f}x" if best_a and best_b else ""
        cap = capacity_ratio(rounds, wl, base)
        cap_cell = (
            f"{cap[0]:.2f}x (rounds: {', '.join(f'{r:.2f}' for r in cap[1])})"
            if cap
            else "— (servers not saturated)"
        )
        lines.append(
            f"| {wl}: sockserve vs {labels[base]} | **{ratio:.2f}x** (rounds: {per}{best}) "
            f"| {cap_cell} | >= {target:.1f}x | {'yes' if ratio >= target else 'no'} |"
        )
    c10k = extras.get("conn10k")
    if isinstance(c10k, dict):
        per = int(c10k["bytes_per_conn"])
        ok_all = c10k["answered"] == c10k["conns"]
        t = float(c10k["answer_s"])
        lines.append(
            f"| {c10k['conns']:,} TCP connections, one request each: all answered "
            f"| {c10k['answered']:,} answered | — | all | {'yes' if ok_all else 'no'} |"
        )
        lines.append(
            f"| ... server memory per connection | {per:,} bytes | — | <= 1,536 bytes | {'yes' if per <= 1536 else 'no'} |"
        )
        lines.append(
            f"| ... all connected and answered | {t:.2f} s | — | <= 2 s | {'yes' if 0 <= t <= 2 else 'no'} |"
        )
    st = extras.get("startup")
    if isinstance(st, dict):
        lines.append(
            f"| `sockserve call` one-shot wall time vs `python -c pass` | **{st['ratio']:.2f}x** "
            f"({st['sockserve_call_ms']} ms vs {st['python_c_pass_ms']} ms) | — | <= 1.3x "
            f"| {'yes' if float(st['ratio']) <= 1.3 else 'no'} |"
        )
    lines += ["", "## Requests/s (median of rounds)", ""]
    lines += table(peers, workloads, lambda p, w: fmt_rps(median_of(rounds, p, w, "rps")))
    lines += [
        "",
        "## Server core time per request, µs (median of rounds)",
        "",
        "Busy time of core 0 (the server's: its CPU and the kernel's network work there)",
        "per request, and in brackets how busy that core was: below ~0.9 the generator,",
        "not the server, set the pace.",
        "",
    ]

    def core_cell(peer: str, wl: str) -> str:
        us = median_of(rounds, peer, wl, "server_core_us")
        busy = median_of(rounds, peer, wl, "server_core_busy")
        return "—" if us is None or busy is None else f"{us:.2f} ({busy:.2f})"

    lines += table(peers, workloads, core_cell)
    lines += ["", "## Latency p50 / p99 (median of rounds, closed loop)", ""]

    def latency_cell(peer: str, wl: str) -> str:
        p50 = median_of(rounds, peer, wl, "p50_us")
        p99 = median_of(rounds, peer, wl, "p99_us")
        return "—" if p50 is None else f"{fmt_us(p50)} / {fmt_us(p99)}"

    lines += table(peers, workloads, latency_cell)
    lines += [
        "",
        "— : not run. The textbook blocking loop serves one stream client at a time, so it only",
        "gets the 1-connection stream workloads (and UDP, which has no connections).",
        "Closed-loop p99 mostly measures queueing behind the other 49 connections; use",
        "`sockserve bench --rate R` for latency at a fixed load.",
    ]
    failed = [
        f"{p}/{w} round {i + 1}: {res['failed']}"
        for i, r in enumerate(rounds)
        for p, ws in r.items()
        for w, res in ws.items()
        if "failed" in res
    ]
    if failed:
        lines += ["", "Failed runs (counted as 0 req/s):", "", *[f"- {f}" for f in failed]]
    errs = [
        f"{p}/{w} round {i + 1}: {res.get('errors')} errors, {res.get('timeouts')} timeouts"
        for i, r in enumerate(rounds)
        for p, ws in r.items()
        for w, res in ws.items()
        if res.get("errors") or res.get("timeouts")
    ]
    if errs:
        lines += ["", "Runs with errors or timeouts:", "", *[f"- {e}" for e in errs]]
    if png:
        lines += ["", f"![requests/s and p99 per server and transport]({png})"]
    if isinstance(c10k, dict):
        lines += [
            "",
            "## 10,000 concurrent connections",
            "",
            "`python benchmarks/conn10k.py`: a sockserve server on core 0; one process on core 1",
            "opens 10,000 TCP connections (non-blocking, in batches of 256), sends one 64-byte",
            "request on each once connected and reads the reply, keeping all open; the server's",
            "RSS is read before and with all 10,000 open.",
            "",
            "```text",
            *[f"{k:>18}: {v}" for k, v in c10k.items()],
            "```",
            "",
            "`listen_overflows` counts handshakes the kernel dropped because the accept queue",
            "(`somaxconn`) was full; each one costs that client a 1 s SYN retransmission.",
        ]
    if isinstance(st, dict):
        lines += [
            "",
            "## `sockserve call` start-up",
            "",
            f"`python benchmarks/startup.py`: `{st['command']}` against `python -c pass`, "
            f"{st['runs']} runs each, alternating; medians.",
            "",
            f"- `python -c pass`: {st['python_c_pass_ms']} ms",
            f"- `sockserve call`: {st['sockserve_call_ms']} ms ({st['ratio']}x)",
        ]
    ys = extras.get("yardstick")
    if isinstance(ys, dict):
        lines += [
            "",
            "## Load generator check",
            "",
            "`sockserve bench --procs 1` against the C yardstick `echobench` (`../shared/tools`),",
            "both driving the C `cecho -t` server, TCP, 50 connections, same rounds:",
            "",
            f"- sockserve bench: {', '.join(f'{v:,.0f}' for v in ys['sockserve_bench_rps'])} req/s",  # type: ignore[attr-defined]
            f"- echobench: {', '.join(f'{v:,.0f}' for v in ys['echobench_rps'])} req/s",  # type: ignore[attr-defined]
            f"- ratio (median of rounds): **{ys['ratio']}** (goal: >= 0.5)",
        ]
    lines += [
        "",
        "## Peers",
        "",
        "Each is written the way its users would write a timestamp server (`benchmarks/peers/`):",
        "",
        "- **uvloop Protocol**: `asyncio.Protocol` whose `data_received` calls `transport.write`,",
        "  `DatagramProtocol` for UDP, on uvloop (`uvloop_protocol.py`).",
        "- **asyncio Protocol**: the same code on the standard library loop (`asyncio_protocol.py`).",
        "- **gevent StreamServer**: monkey-patched blocking-style handler, `DatagramServer` for UDP.",
        "- **socketserver threads**: `ThreadingTCPServer` / `ThreadingUnixStreamServer`, plain `UDPServer`.",
        "- **Twisted**: `Protocol.dataReceived` / `DatagramProtocol` on the default reactor.",
        "- **textbook blocking loop**: `accept` then `recv`/`send` until the client leaves; `recvfrom`/`sendto`.",
        "- **sockserve**: `sockserve serve timestamp` with its defaults (uvloop engine).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--duration", type=float, default=3.0, help="seconds measured per run (default 3)"
    )
    p.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of warm-up per run (default 1)"
    )
    p.add_argument(
        "--servers", help="comma-separated subset of: " + ",".join(x.name for x in PEERS_ALL)
    )
    p.add_argument(
        "--workloads", help="comma-separated subset of: " + ",".join(w.name for w in WORKLOADS)
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.25,
        help="rerun a measurement if other processes used more than this many cores (default 0.25)",
    )
    p.add_argument(
        "--retries", type=int, default=2, help="reruns of a disturbed measurement (default 2)"
    )
    p.add_argument("--no-10k", action="store_true", help="skip the 10,000-connection test")
    p.add_argument(
        "--no-startup", action="store_true", help="skip the `sockserve call` start-up test"
    )
    p.add_argument(
        "--yardsticks",
        type=Path,
        help="folder with echobench and cecho: add the generator check and the C server as a reference row",
    )
    p.add_argument(
        "--quick", action="store_true", help="1 round, 1 s, 0.5 s warm-up: checks the suite runs"
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.5
    peers = PEERS_ALL
    if args.servers:
        names = args.servers.split(",")
        peers = [x for x in PEERS_ALL if x.name in names]
    if args.yardsticks:
        peers = [*peers, c_reference(args.yardsticks)]
    workloads = WORKLOADS
    if args.workloads:
        names = args.workloads.split(",")
        workloads = [w for w in WORKLOADS if w.name in names]
    command = "python benchmarks/run.py " + shlex.join(sys.argv[1:])
    started = time.monotonic()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="ssbench-", dir="/tmp") as tmpname:
        tmp = Path(tmpname)
        for rnd in range(args.rounds):
            rounds.append(run_round(rnd, peers, workloads, args, tmp))
    extras: dict[str, object] = {}
    if not args.no_10k:
        print("10k connections...", flush=True)
        extras["conn10k"] = conn10k.run()
        print(f"  {extras['conn10k']}", flush=True)
    if not args.no_startup:
        print("sockserve call start-up...", flush=True)
        extras["startup"] = startup.run(10 if args.quick else 30)
        print(f"  {extras['startup']}", flush=True)
    if args.yardsticks:
        print("generator check against echobench...", flush=True)
        extras["yardstick"] = yardstick_check(args.yardsticks, args)
        print(f"  {extras['yardstick']}", flush=True)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    have_png = plot(rounds, peers, workloads, png)
    text = write_report(
        rounds, peers, workloads, args, extras, command.strip(), png.name if have_png else None
    )
    out.write_text(text)
    raw = ROOT / "benchmarks" / "results.json"
    raw.write_text(json.dumps({"command": command, "rounds": rounds, **extras}, indent=1))
    print(f"wrote {out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
