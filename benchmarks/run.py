"""The benchmark suite: sockserve against the servers people would otherwise write, one command.

    python benchmarks/run.py                 # the full run (about 10 minutes), writes docs/benchmarks.md
    python benchmarks/run.py --quick         # 1 round of 1 s: a smoke test of the suite itself
    python benchmarks/run.py --before main   # also main's sockserve servers, same rounds

The published run (issue 12's table before and after, the pipelined variants, the
fairness figure, every goal) is one command, from the checkout to measure:

    python benchmarks/run.py --rounds 3 --before OLD_COMMIT --yardsticks /tmp/yard

``--before`` installs that commit's sockserve (C helper built) from a temporary worktree
into the temporary folder and runs each sockserve server from it too, in the same rounds,
so before and after are measured seconds apart against the same peers.

Every server runs the timestamp service (64-byte request, 91-byte reply) on TCP,
a Unix stream socket and UDP (line and length framed, and from an ``async def``
handler, against peers of the same kind: :mod:`workloads`), pinned to core 0; ``sockserve bench`` drives it
from core 1. Rounds alternate the servers (round 2 runs them in another order)
so drift on a noisy machine spreads over all of them; the report gives the
median of the rounds, and goal ratios are medians of per-round ratios, each
taken from the same round.

Outputs: ``docs/benchmarks.md`` (tables, machine, command), ``docs/benchmarks.png``
(requests/s and p99 per server and workload) and ``benchmarks/results.json``
(every round's raw ``sockserve bench --json`` object).

This file is the command line; the parts are :mod:`workloads` (what runs:
workloads, peers, goals), :mod:`measure` (one run, one round), :mod:`summary`
(medians and ratios) and :mod:`report` (the Markdown and the plot), beside
:mod:`conn10k` and :mod:`startup`, which also run on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import conn10k
import fairness
import startup
from common import PEERS, ROOT, old_checkout
from measure import run_round, yardstick_check
from report import plot, write_report
from workloads import PEERS_ALL, WORKLOADS, before, c_reference


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
    p.add_argument(
        "--before",
        metavar="COMMIT",
        help="also run each sockserve server from COMMIT (a worktree built in a temp folder),"
        " in the same rounds, for before/after figures",
    )
    p.add_argument("--no-fairness", action="store_true", help="skip the blocking-handler test")
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
    # `sockserve serve async_handlers:timestamp` imports the handler the peers share.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PEERS), os.environ.get("PYTHONPATH", "")])
    started = time.monotonic()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="ssbench-", dir="/tmp") as tmpname:
        tmp = Path(tmpname)
        if args.before:
            src, args.before_rev = old_checkout(args.before, tmp / "before")
            ours = [x for x in peers if x.name.startswith("sockserve")]
            peers = [*peers, *(before(x, src, args.before_rev) for x in ours)]
        for rnd in range(args.rounds):
            rounds.append(run_round(rnd, peers, workloads, args, tmp))
    extras: dict[str, object] = {}
    if not args.no_10k:
        print("10k connections...", flush=True)
        extras["conn10k"] = conn10k.run()
        print(f"  {extras['conn10k']}", flush=True)
    if not args.no_fairness:
        print("fairness: other clients while a def handler blocks...", flush=True)
        extras["fairness"] = fairness.run(1 if args.quick else args.rounds)
        print(f"  {extras['fairness']}", flush=True)
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
