"""TLS: sockserve's tls:// against the uvloop ``Protocol`` + ``ssl=`` peer, in one run.

    .venv/bin/python benchmarks/tls.py [--rounds 3] [--duration 5] [--conns 50,1]
                                       [--handshake-conns 8]

Per round, each server (started afresh, pinned to core 0, the timestamp service on a
throwaway P-256 certificate) gets, in turn, from clients pinned to core 1:

- requests/s at each ``--conns`` count: ``sockserve bench tls://... -c N`` (64-byte
  requests), and the server's core time per request (/proc);
- handshakes/s: ``--handshake-conns`` clients that each connect, handshake, send one
  request, read its reply and close, over and over (full handshakes; then again offering
  the session ticket of the last connection: resumed handshakes).

Rounds alternate which server goes first; the figures are medians over rounds, and the
ratios sockserve/uvloop are taken within each round, then their median. A busy machine
shows in the spread between rounds: read a change inside it as noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    LOAD_CORE,
    PEERS,
    PYTHON,
    free_port,
    make_cert,
    pinned,
    server_process,
    wait_ready,
)
from measure import proc_cpu

SERVERS = {
    "sockserve": lambda port, cert, key: [
        *(PYTHON, "-m", "sockserve", "serve", "timestamp", "-q"),
        *("--listen", f"tls://127.0.0.1:{port}", "--tls-cert", cert, "--tls-key", key),
    ],
    "uvloop": lambda port, cert, key: [
        *(PYTHON, str(PEERS / "uvloop_protocol.py"), "--tcp", str(port), "--tls", cert, key),
    ],
}


# -- the handshake client (run as its own process, pinned to the load core) ---------------


async def _handshakes(port: int, ca: str, seconds: float, conns: int) -> int:
    """Full handshakes: asyncio clients (uvloop's TLS), none offering a session."""
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    done = 0
    deadline = time.monotonic() + seconds

    async def one_client() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(b"hello")
            await reader.read(1024)
            writer.close()
            done += 1

    await asyncio.gather(*(one_client() for _ in range(conns)))
    return done


def _resumed_handshakes(port: int, ca: str, seconds: float, conns: int) -> int:
    """Blocking clients in threads (the handshake releases the GIL), each offering the
    session ticket its last connection got."""
    import socket
    import ssl
    import threading

    ctx = ssl.create_default_context(cafile=ca)
    counts = [0] * conns
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        session = None
        while time.monotonic() < deadline:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
                s.sendall(b"hello")
                s.recv(1024)
                session = s.session
            counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


def handshake_client(argv: list[str]) -> None:
    port, ca, seconds, conns, mode = int(argv[0]), argv[1], float(argv[2]), int(argv[3]), argv[4]
    if mode == "resumed":
        n = _resumed_handshakes(port, ca, seconds, conns)
    else:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
        n = asyncio.run(_handshakes(port, ca, seconds, conns))
    print(json.dumps({"handshakes": n, "seconds": seconds}))


# -- the runner ---------------------------------------------------------------------------


def measure(
    name: str, args: argparse.Namespace, cert: str, key: str, log: Path
) -> dict[str, float]:
    port = free_port()
    out: dict[str, float] = {}
    with server_process(SERVERS[name](port, cert, key), log) as proc:
        wait_ready(tcp_port=port)
        for conns in args.conns:
            cmd = [
                *(PYTHON, "-m", "sockserve", "bench", f"tls://127.0.0.1:{port}", "--tls-ca", cert),
                *("-c", str(conns), "-d", str(args.duration), "--warmup", "1", "--json", "-q"),
            ]
            bench = subprocess.Popen(pinned(cmd, LOAD_CORE), stdout=subprocess.PIPE)
            time.sleep(1)  # the warm-up: core time counts from the measured part
            cpu0 = proc_cpu(proc.pid)
            stdout, _ = bench.communicate(timeout=args.duration + 60)
            cpu1 = proc_cpu(proc.pid)
            res = json.loads(stdout)
            out[f"rps-{conns}"] = float(res["rps"])
            out[f"core_us-{conns}"] = (cpu1 - cpu0) * 1e6 / max(1, res["requests"])
        for mode in ("full", "resumed"):
            cmd = [
                *(PYTHON, __file__, "--handshake-client", str(port), cert),
                *(str(args.duration), str(args.handshake_conns), mode),
            ]
            got = subprocess.run(
                pinned(cmd, LOAD_CORE), capture_output=True, timeout=args.duration + 60, check=True
            )
            res = json.loads(got.stdout)
            out[f"handshakes-{mode}"] = res["handshakes"] / res["seconds"]
    return out


def main() -> int:
    if sys.argv[1:2] == ["--handshake-client"]:
        handshake_client(sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--conns", type=lambda s: [int(x) for x in s.split(",")], default=[50, 1])
    p.add_argument("--handshake-conns", type=int, default=8)
    args = p.parse_args()
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="sockserve-tls-") as tmp:
        cert, key = make_cert(Path(tmp))
        log = Path(tmp) / "servers.log"
        for r in range(args.rounds):
            order = list(SERVERS) if r % 2 == 0 else list(reversed(SERVERS))
            got = {name: measure(name, args, cert, key, log) for name in order}
            rounds.append(got)
            line = "  ".join(
                f"{name} {got[name]['rps-' + str(args.conns[0])]:,.0f} req/s "
                f"{got[name]['handshakes-full']:,.0f} hs/s"
                for name in SERVERS
            )
            print(f"round {r + 1}: {line}", flush=True)
    keys = list(rounds[0]["sockserve"])
    print(f"\n{'measure':<22} {'sockserve':>12} {'uvloop ssl=':>12} {'ratio':>7}  (per round)")
    for k in keys:
        ours = statistics.median(r["sockserve"][k] for r in rounds)
        peer = statistics.median(r["uvloop"][k] for r in rounds)
        each = [r["sockserve"][k] / r["uvloop"][k] for r in rounds if r["uvloop"][k]]
        if k.startswith("core_us"):  # less is better: the ratio is theirs over ours
            each = [1 / x for x in each if x]
        ratio = statistics.median(each) if each else float("nan")
        spread = " ".join(f"{x:.2f}" for x in each)
        print(f"{k:<22} {ours:>12,.1f} {peer:>12,.1f} {ratio:>6.2f}x  ({spread})")
    print("\nrps-N: requests/s at N connections; core_us-N: server core time per request (ratio:")
    print("uvloop's over sockserve's, > 1 is less for sockserve); handshakes-*: per second.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
