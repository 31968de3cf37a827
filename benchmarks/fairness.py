"""Fairness: what other clients wait while a ``def`` handler blocks on some requests.

The issue's goal (issue 12, item 1): while 3 requests each block their handler for 1 s
(after the first such request has been seen), another client's 20 requests each get
their reply in under 100 ms. The handler, ``async_handlers:sometimes_sleeps``, sleeps a
second on requests starting with ``sleep`` and answers the rest at once.

One run: the server (``sockserve serve``, pinned to core 0) gets one ``sleep`` request
(seen to block: its handler moves to the handler threads), then 3 more at once on 3
connections; while those sleep, the other client (core 1) sends its requests one after
the other and times each. ``--mode nonblocking`` shows the old behaviour (the handler
always inline); ``--mode blocking`` marks it blocking from the start.

    python benchmarks/fairness.py [--mode auto|nonblocking|blocking] [--rounds 3] [--json]

Prints the other client's p50/p99/max in ms per round, and their medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import LOAD_CORE, PEERS, PYTHON, free_port, pin_self, server_process, wait_ready

import sockserve

SLOW_REQUESTS = 3
TIMEOUT = 30.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ask(url: str, request: bytes) -> None:
    with sockserve.connect(url, timeout=TIMEOUT) as c:
        c.request(request)


def one_round(mode: str, requests: int, log: Path) -> dict[str, float]:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    cmd = [PYTHON, "-m", "sockserve", "serve", "async_handlers:sometimes_sleeps", "--listen", url]
    if mode != "auto":
        cmd.append(f"--{mode}")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(PEERS), os.environ.get("PYTHONPATH", "")])
    with server_process(cmd, log):
        wait_ready(tcp_port=port)
        _ask(url, b"sleep first")  # the first such request: seen to block
        sleepers = [
            threading.Thread(target=_ask, args=(url, b"sleep")) for _ in range(SLOW_REQUESTS)
        ]
        for t in sleepers:
            t.start()
        time.sleep(0.05)  # the slow requests are in the server
        took: list[float] = []
        with sockserve.connect(url, timeout=TIMEOUT) as c:
            for i in range(requests):
                start = time.perf_counter()
                c.request(b"hello %d" % i)
                took.append((time.perf_counter() - start) * 1000)
        for t in sleepers:
            t.join(TIMEOUT)
    return {
        "p50_ms": round(statistics.median(took), 3),
        "p99_ms": round(_percentile(took, 0.99), 3),
        "max_ms": round(max(took), 3),
    }


def run(rounds: int, requests: int = 20) -> dict[str, object]:
    """Rounds of each mode (auto: as sockserve serves by default; nonblocking: the handler
    kept inline, as before issue 12), for the suite: each mode's rounds and medians."""
    log = Path(tempfile.mkdtemp(prefix="fairness-")) / "server.log"
    out: dict[str, object] = {"requests": requests, "slow": SLOW_REQUESTS}
    for mode in ("auto", "nonblocking"):
        got = [one_round(mode, requests, log) for _ in range(rounds)]
        out[mode] = {k: statistics.median(r[k] for r in got) for k in got[0]} | {"rounds": got}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("auto", "nonblocking", "blocking"), default="auto")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    pin_self(LOAD_CORE)
    log = Path(tempfile.mkdtemp(prefix="fairness-")) / "server.log"
    rounds = [one_round(args.mode, args.requests, log) for _ in range(args.rounds)]
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    if args.json:
        print(json.dumps({"mode": args.mode, "rounds": rounds, "median": median}))
        return
    for i, r in enumerate(rounds, 1):
        print(f"round {i}: p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  max {r['max_ms']} ms")
    print(
        f"median ({args.mode}, {args.requests} requests while {SLOW_REQUESTS} block 1 s): "
        f"p50 {median['p50_ms']} ms  p99 {median['p99_ms']} ms  max {median['max_ms']} ms"
    )


if __name__ == "__main__":
    main()
