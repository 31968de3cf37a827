"""One-shot ``sockserve call`` wall time against ``python -c pass`` (the floor any Python CLI pays).

Runs the two alternately (so drift hits both), each to completion, and reports
the medians and their ratio. The server answering the calls runs on core 0;
this script and its children on core 1.

    python benchmarks/startup.py [-n 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import LOAD_CORE, PYTHON, free_port, pin_self, server_process, wait_ready

SOCKSERVE = str(Path(PYTHON).with_name("sockserve"))


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run(n: int = 30) -> dict[str, object]:
    port = free_port()
    log = Path(tempfile.gettempdir()) / "sockserve-bench-startup.log"
    serve = [PYTHON, "-m", "sockserve", "serve", "--log-level", "warning"]
    serve += ["--listen", f"tcp://127.0.0.1:{port}"]
    call = [SOCKSERVE, "call", f"tcp://127.0.0.1:{port}", "hello"]
    bare = [PYTHON, "-c", "pass"]
    with server_process(serve, log):
        wait_ready(port)
        pin_self(LOAD_CORE)
        for _ in range(3):  # warm the page cache and the .pyc files
            wall(bare)
            wall(call)
        t_bare: list[float] = []
        t_call: list[float] = []
        for i in range(n):
            pair = [(bare, t_bare), (call, t_call)]
            for cmd, times in pair if i % 2 == 0 else pair[::-1]:
                times.append(wall(cmd))
    mb, mc = statistics.median(t_bare), statistics.median(t_call)
    return {
        "runs": n,
        "python_c_pass_ms": round(mb * 1000, 1),
        "sockserve_call_ms": round(mc * 1000, 1),
        "ratio": round(mc / mb, 2),
        "command": " ".join(["sockserve", *call[1:]]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=30, help="runs of each (default 30)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = run(args.n)
    print(json.dumps(res) if args.json else "\n".join(f"{k:>18}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
