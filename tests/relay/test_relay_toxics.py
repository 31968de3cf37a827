"""Toxics through the stream relay, measured on real sockets: latency adds its delay to a
round trip, limit_data closes after exactly that many bytes, reset_peer resets, a toxic
added while a connection is open reaches it, and removing it restores the plain path.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
from relay_helpers import connect, read_to_eof
from support import wait_for

from sockserve.relay import RelayThread
from sockserve.relay.toxics import Direction, Toxic, parse_toxic
from sockserve.server import ServerThread

Serve = Callable[..., ServerThread]
StartRelay = Callable[..., RelayThread]


def round_trip(c: socket.socket, payload: bytes = b"ping") -> float:
    started = time.perf_counter()
    c.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = c.recv(65536)
        assert chunk, "closed"
        got += chunk
    assert got == payload
    return time.perf_counter() - started


def best_of(c: socket.socket, n: int = 5) -> float:
    return min(round_trip(c) for _ in range(n))


@pytest.mark.parametrize("stream", ["downstream", "upstream"])
def test_latency_adds_its_delay_to_a_round_trip(
    sockserve_relay: StartRelay, serve: Serve, stream: Direction
) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    plain = sockserve_relay(srv.url("tcp"))
    slow = sockserve_relay(srv.url("tcp"), toxics=[parse_toxic("latency=100", stream)])
    with connect(plain.url()) as a, connect(slow.url()) as b:
        base, delayed = best_of(a), best_of(b)
    added = delayed - base
    assert 0.095 <= added <= 0.15, (base, delayed)
    wait_for(lambda: slow.stats.toxics.get("latency") == 1, what="the toxic counted")


def test_limit_data_closes_after_exactly_that_many_bytes(
    sockserve_relay: StartRelay, serve: Serve
) -> None:
    srv = serve("chargen", "tcp://127.0.0.1:0")
    relay = sockserve_relay(
        srv.url("tcp"), toxics=[Toxic("limit_data", attributes={"bytes": 12345})]
    )
    with connect(relay.url()) as c:
        assert len(read_to_eof(c)) == 12345


def test_reset_peer_resets_the_client(sockserve_relay: StartRelay, serve: Serve) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    relay = sockserve_relay(
        srv.url("tcp"), toxics=[Toxic("reset_peer", attributes={"timeout": 50})]
    )
    with connect(relay.url()) as c:
        c.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            while c.recv(100):
                pass


def test_a_toxic_added_live_reaches_an_open_connection_and_leaves_it(
    sockserve_relay: StartRelay, serve: Serve
) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    relay = sockserve_relay(srv.url("tcp"))
    with connect(relay.url()) as c:
        base = best_of(c)
        relay.toxics.add(Toxic("latency", attributes={"latency": 80}))
        assert best_of(c, 3) - base >= 0.075
        relay.toxics.remove("latency_downstream")
        assert best_of(c, 3) < 0.05
        c.shutdown(socket.SHUT_WR)
        assert read_to_eof(c) == b""


def test_toxicity_zero_never_applies(sockserve_relay: StartRelay, serve: Serve) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    relay = sockserve_relay(
        srv.url("tcp"), toxics=[Toxic("latency", toxicity=0.0, attributes={"latency": 200})]
    )
    with connect(relay.url()) as c:
        assert best_of(c, 3) < 0.1


def test_half_close_passes_through_a_toxic(sockserve_relay: StartRelay, serve: Serve) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    relay = sockserve_relay(
        srv.url("tcp"),
        toxics=[
            Toxic("latency", attributes={"latency": 30}),
            Toxic("latency", stream="upstream", attributes={"latency": 30}),
        ],
    )
    with connect(relay.url()) as c:
        c.sendall(b"a" * 100_000)
        c.shutdown(socket.SHUT_WR)
        assert read_to_eof(c) == b"a" * 100_000


def test_bytes_held_by_a_toxic_still_reach_a_target_that_half_closed(
    sockserve_relay: StartRelay,
) -> None:
    """The client sends and half-closes; an upstream latency holds its bytes and its FIN
    while the target answers and half-closes: the held bytes still arrive."""
    from relay_helpers import OnePeer

    def target(conn: socket.socket) -> bytes:
        conn.sendall(b"early answer")
        conn.shutdown(socket.SHUT_WR)
        return read_to_eof(conn)

    peer = OnePeer(target)
    relay = sockserve_relay(
        peer.url, toxics=[Toxic("latency", stream="upstream", attributes={"latency": 100})]
    )
    with connect(relay.url()) as c:
        c.sendall(b"late question")
        c.shutdown(socket.SHUT_WR)
        assert read_to_eof(c) == b"early answer"
    assert peer.result() == b"late question"
