"""What the benchmark suite runs: workloads, the peer servers, the goals, and the results' shape.

Every server runs the timestamp service on TCP, a Unix stream socket and UDP;
a *workload* is one transport at one number of connections (and one framing, with
so many requests in flight per connection). Line and length framed workloads run
against servers of their own framing: sockserve with ``--framing``, and the
hand-written uvloop Protocols that split their buffer. The goals are the issue's:
sockserve's requests/s over a named peer's, per workload.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from common import PEERS, PYTHON

#: One round's results: peer name -> workload name -> one ``sockserve bench --json`` object
#: (plus the runner's ``foreign_cpu``, ``server_core_us``, ``server_core_busy``, ``failed``).
Round = dict[str, dict[str, dict[str, object]]]
Rounds = list[Round]


@dataclass(frozen=True)
class Workload:
    name: str
    scheme: str  # tcp | unix | udp
    conns: int
    framing: str = "raw"
    pipeline: int = 1
    ours: str = "sockserve"  # the sockserve server (peer name) that serves it


RAW_WORKLOADS = [
    Workload("tcp-50", "tcp", 50),
    Workload("tcp-1", "tcp", 1),
    Workload("unix-50", "unix", 50),
    Workload("unix-1", "unix", 1),
    Workload("udp-50", "udp", 50),
]
FRAMED_WORKLOADS = [
    Workload(
        f"{framing}-{conns}{'-p16' * (depth > 1)}",
        "tcp",
        conns,
        framing,
        depth,
        f"sockserve-{framing}",
    )
    for framing in ("line", "length")
    for conns, depth in ((50, 1), (1, 1), (50, 16))
]
#: TLS (issue 12): the timestamp service over tls:// on a throwaway P-256 certificate.
TLS_WORKLOADS = [Workload(f"tls-{n}", "tls", n, ours="sockserve-tls") for n in (50, 1)]
#: An ``async def`` handler (benchmarks/peers/async_handlers.py) against asyncio streams
#: on uvloop running the same handler (issue 12, item 2).
ASYNC_WORKLOADS = [
    Workload("async-50", "tcp", 50, ours="sockserve-async"),
    Workload("async-1", "tcp", 1, ours="sockserve-async"),
    Workload("async-udp-50", "udp", 50, ours="sockserve-async"),
]
WORKLOADS = RAW_WORKLOADS + FRAMED_WORKLOADS + TLS_WORKLOADS + ASYNC_WORKLOADS
BY_NAME = {w.name: w for w in WORKLOADS}


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    argv: tuple[str, ...]  # {tcp} {udp} {unix} are filled in
    workloads: tuple[str, ...] = tuple(w.name for w in RAW_WORKLOADS)
    env: tuple[tuple[str, str], ...] = ()  # on top of the runner's environment


#: Suffix of the name of a sockserve server run from an older commit (``--before``).
BEFORE = "@before"


def before(peer: Peer, src: Path, rev: str) -> Peer:
    """``peer`` (a sockserve server) run from the older checkout whose sources are ``src``."""
    path = os.pathsep.join([str(src), str(PEERS), os.environ.get("PYTHONPATH", "")])
    return replace(
        peer,
        name=peer.name + BEFORE,
        label=f"{peer.label}, before ({rev})",
        env=(("PYTHONPATH", path),),
    )


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
    *(
        peer
        for framing in ("line", "length")
        for peer in (
            Peer(
                f"sockserve-{framing}",
                f"sockserve --framing {framing}",
                (
                    *(PYTHON, "-m", "sockserve", "serve", "timestamp", "--framing", framing),
                    *("--listen", "tcp://127.0.0.1:{tcp}"),
                ),
                tuple(w.name for w in FRAMED_WORKLOADS if w.framing == framing),
            ),
            Peer(
                f"uvloop-{framing}",
                f"uvloop Protocol, {framing} buffer",
                (
                    PYTHON,
                    str(PEERS / f"asyncio_{framing}_protocol.py"),
                    "--uvloop",
                    "--tcp",
                    "{tcp}",
                ),
                tuple(w.name for w in FRAMED_WORKLOADS if w.framing == framing),
            ),
        )
    ),
    Peer(
        "sockserve-tls",
        "sockserve tls://",
        (
            *(PYTHON, "-m", "sockserve", "serve", "timestamp", "--listen"),
            *("tls://127.0.0.1:{tcp}", "--tls-cert", "{cert}", "--tls-key", "{key}"),
        ),
        tuple(w.name for w in TLS_WORKLOADS),
    ),
    Peer(
        "uvloop-tls",
        "uvloop Protocol, ssl=",
        (PYTHON, str(PEERS / "uvloop_protocol.py"), "--tcp", "{tcp}", "--tls", "{cert}", "{key}"),
        tuple(w.name for w in TLS_WORKLOADS),
    ),
    Peer(
        "uvloop-line-streams",
        "uvloop streams, readline",
        (
            PYTHON,
            str(PEERS / "asyncio_line_protocol.py"),
            "--uvloop",
            "--streams",
            "--tcp",
            "{tcp}",
        ),
        ("line-50", "line-1"),
    ),
    Peer(
        "sockserve-async",
        "sockserve, async def handler",
        (
            *(PYTHON, "-m", "sockserve", "serve", "async_handlers:timestamp"),
            *("--listen", "tcp://127.0.0.1:{tcp}", "--listen", "udp://127.0.0.1:{udp}"),
        ),
        tuple(w.name for w in ASYNC_WORKLOADS),
    ),
    Peer(
        "uvloop-streams",
        "uvloop streams, async def handler",
        (PYTHON, str(PEERS / "uvloop_streams_async.py"), "--tcp", "{tcp}", "--udp", "{udp}"),
        tuple(w.name for w in ASYNC_WORKLOADS),
    ),
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
    # Line and length framing (issue 12): >= 1.1x the hand-written Protocol at 50
    # connections (pipelined too), ahead at 1.
    *(
        (f"{framing}-{conns}", target, f"uvloop-{framing}")
        for framing in ("line", "length")
        for conns, target in (("50", 1.1), ("1", 1.0), ("50-p16", 1.1))
    ),
    ("tls-50", 1.1, "uvloop-tls"),  # TLS (issue 12): the uvloop Protocol with ssl=
    ("line-50", 1.1, "uvloop-line-streams"),
    # Async handlers (issue 12): >= 1.1x asyncio streams on uvloop, at 1 and 50
    # connections, and over UDP (a DatagramProtocol running each request in a task).
    ("async-50", 1.1, "uvloop-streams"),
    ("async-1", 1.1, "uvloop-streams"),
    ("async-udp-50", 1.1, "uvloop-streams"),
]


def c_reference(ydir: Path) -> Peer:
    """The C yardstick ``cecho -t`` as a reference row: what one core does with no
    interpreter at all (TCP and UDP on one port; no Unix sockets)."""
    return Peer(
        "cecho",
        "C epoll server (yardstick)",
        (str(ydir / "cecho"), "{tcp}", "-t"),
        ("tcp-50", "tcp-1", "udp-50"),
    )
