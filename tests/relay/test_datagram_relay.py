"""Datagram relaying (relay/flows.py) on real sockets: textbook UDP and unixgram clients
through the relay to textbook servers, flows per source, idle expiry, a refusing target,
the flow cap, floods, size limits, and the toxics end to end."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from strict import needs_ipv6
from support import check_stamp, wait_for

from sockserve.config import ServerConfig
from sockserve.endpoints import Endpoint, parse_endpoint
from sockserve.errors import ConfigError
from sockserve.relay.flow import MAX_DATAGRAM
from sockserve.relay.flows import DatagramRelay
from sockserve.relay.runner import Relay, RelayThread
from sockserve.relay.toxics import Toxic, ToxicError, ToxicSet
from sockserve.server import ServerThread
from sockserve.server.listeners import close_listener, open_listener

T = TypeVar("T")
TIMEOUT = 5.0


class LoopThread:
    """An event loop in a background thread; ``run(fn)`` calls ``fn`` on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, fn: Callable[[], T]) -> T:
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return done.result(TIMEOUT)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()


@contextlib.contextmanager
def relaying(
    listen: str, target: str | Endpoint, toxics: ToxicSet | None = None, **kw: Any
) -> Iterator[DatagramRelay]:
    """A DatagramRelay from ``listen`` to ``target`` on a loop thread; ``kw``: ServerConfig
    fields, plus ``flow_timeout`` and ``rng``."""
    own = {k: kw.pop(k) for k in ("flow_timeout", "rng") if k in kw}
    config = ServerConfig(**kw)
    lt = LoopThread()
    lst = open_listener(parse_endpoint(listen), backlog=1)
    ep = target if isinstance(target, Endpoint) else parse_endpoint(target)

    def make() -> DatagramRelay:
        relay = DatagramRelay(lt.loop, lst, ep, toxics, config, **own)
        relay.start()
        return relay

    try:
        relay = lt.run(make)
        try:
            yield relay
        finally:
            lt.run(relay.close)
    finally:
        close_listener(lst)
        lt.close()


class EchoTarget:
    """A textbook datagram echo server in a thread: each datagram back to its sender."""

    def __init__(self, family: int, addr: Any) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(addr)
        self.sock.settimeout(0.05)
        self.peers: list[Any] = []
        self.received: list[bytes] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        name = self.sock.getsockname()
        if self.sock.family == socket.AF_UNIX:
            return f"unixgram://{name}"
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"udp://{host}:{name[1]}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer)
            self.received.append(data)
            if peer:
                with contextlib.suppress(OSError):
                    self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop = True
        self.thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Callable[..., EchoTarget]]:
    made: list[EchoTarget] = []

    def make(family: int = socket.AF_INET, addr: Any = ("127.0.0.1", 0)) -> EchoTarget:
        made.append(EchoTarget(family, addr))
        return made[-1]

    yield make
    for target in made:
        target.close()


def client(listen: Endpoint) -> socket.socket:
    """A textbook client socket for ``listen``, connected (unixgram: autobound, to get replies)."""
    if listen.is_unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind("")
    else:
        s = socket.socket(socket.AF_INET6 if listen.is_ipv6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(TIMEOUT)
    s.connect(listen.address())
    return s


def nothing_comes(s: socket.socket, wait: float = 0.3) -> bool:
    s.settimeout(wait)
    try:
        s.recv(MAX_DATAGRAM)
    except TimeoutError:
        return True
    finally:
        s.settimeout(TIMEOUT)
    return False


def listen_url(kind: str, sock_dir: Path, name: str = "relay.sock") -> str:
    return f"unixgram://{sock_dir / name}" if kind == "unixgram" else "udp://127.0.0.1:0"


# -- textbook client -> relay -> textbook server ----------------------------------------


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        ("udp", "udp"),
        pytest.param("udp6", "udp6", marks=needs_ipv6),
        ("unixgram", "unixgram"),
        ("udp", "unixgram"),
        ("unixgram", "udp"),
    ],
)
def test_timestamp_through_relay(listen: str, target: str, sock_dir: Path) -> None:
    target_url = {
        "udp": "udp://127.0.0.1:0",
        "udp6": "udp://[::1]:0",
        "unixgram": f"unixgram://{sock_dir / 'target.sock'}",
    }[target]
    listen_at = "udp://[::1]:0" if listen == "udp6" else listen_url(listen, sock_dir)
    with (
        ServerThread("timestamp", target_url) as server,
        relaying(listen_at, server.endpoints[0]) as relay,
        client(relay.endpoint) as c,
    ):
        for request in (b"hello", b"", b"\x00\xffbinary\n"):
            c.send(request)
            check_stamp(c.recv(MAX_DATAGRAM), request)
        assert relay.stats.connections == 1
        assert relay.counts.datagrams_up == 3
        assert relay.counts.datagrams_down == 3


def test_two_clients_get_their_own_replies(echo: Callable[..., EchoTarget]) -> None:
    target = echo()
    with relaying("udp://127.0.0.1:0", target.url) as relay:
        a, b = client(relay.endpoint), client(relay.endpoint)
        with a, b:
            for i in range(20):
                a.send(b"a%d" % i)
                b.send(b"b%d" % i)
            assert [a.recv(100) for _ in range(20)] == [b"a%d" % i for i in range(20)]
            assert [b.recv(100) for _ in range(20)] == [b"b%d" % i for i in range(20)]
        assert len(set(target.peers)) == 2  # one flow socket per client
        assert relay.stats.open == 2


@pytest.mark.parametrize("kind", ["udp", "unixgram"])
def test_largest_and_empty_datagrams_cross_whole(
    kind: str, echo: Callable[..., EchoTarget], sock_dir: Path
) -> None:
    if kind == "udp":
        target, largest = echo(), 65507  # the largest UDP payload over IPv4
    else:
        target, largest = echo(socket.AF_UNIX, str(sock_dir / "t.sock")), MAX_DATAGRAM
    with relaying(listen_url(kind, sock_dir), target.url) as relay, client(relay.endpoint) as c:
        for size in (largest, 0, 1, largest - 1):
            data = os.urandom(size)
            c.send(data)
            assert c.recv(MAX_DATAGRAM + 1) == data
        assert [len(d) for d in target.received] == [largest, 0, 1, largest - 1]


def test_unixgram_datagram_over_the_limit_is_dropped_not_cut(
    echo: Callable[..., EchoTarget], sock_dir: Path
) -> None:
    target = echo(socket.AF_UNIX, str(sock_dir / "t.sock"))
    with relaying(listen_url("unixgram", sock_dir), target.url) as relay:
        with client(relay.endpoint) as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_DATAGRAM)
            c.send(b"x" * (MAX_DATAGRAM + 1))
            c.send(b"after")
            assert c.recv(MAX_DATAGRAM + 1) == b"after"
        assert target.received == [b"after"]
        assert relay.counts.dropped == 1


def test_unbound_unixgram_client_is_relayed_one_way(
    echo: Callable[..., EchoTarget], sock_dir: Path
) -> None:
    target = echo()
    with relaying(listen_url("unixgram", sock_dir), target.url) as relay:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:  # no name: no replies
            s.sendto(b"one way", relay.endpoint.path)
            wait_for(lambda: relay.counts.dropped == 1, what="the reply dropped (no address)")
        assert target.received == [b"one way"]


# -- flows: expiry, the cap, a refusing target -------------------------------------------


def test_idle_flow_expires_and_a_new_one_opens(
    echo: Callable[..., EchoTarget], server_logs: Any
) -> None:
    target = echo()
    with relaying("udp://127.0.0.1:0", target.url, flow_timeout=0.2) as relay:
        with client(relay.endpoint) as c:
            c.send(b"1")
            assert c.recv(10) == b"1"
            wait_for(lambda: relay.stats.open == 0, what="the idle flow closed")
            server_logs.wait_for("closed: idle for 0.2s")
            c.send(b"2")
            assert c.recv(10) == b"2"
        assert relay.stats.connections == 2
        assert target.peers[0] != target.peers[1]  # a fresh socket towards the target


def test_idle_timeout_setting_is_the_flow_timeout(echo: Callable[..., EchoTarget]) -> None:
    with relaying("udp://127.0.0.1:0", echo().url, idle_timeout=0.2) as relay:
        assert relay.flow_timeout == 0.2
        with client(relay.endpoint) as c:
            c.send(b"x")
            assert c.recv(10) == b"x"
            wait_for(lambda: relay.stats.open == 0, what="the idle flow closed")
    with relaying("udp://127.0.0.1:0", echo().url) as relay:
        assert relay.flow_timeout == 60.0  # serve's 300 s is for connections


def test_traffic_either_way_keeps_a_flow(echo: Callable[..., EchoTarget]) -> None:
    with (
        relaying("udp://127.0.0.1:0", echo().url, flow_timeout=0.4) as relay,
        client(relay.endpoint) as c,
    ):
        for _ in range(8):  # 8 x 0.1 s: twice the timeout, never idle that long
            c.send(b"x")
            assert c.recv(10) == b"x"
            assert nothing_comes(c, 0.1)
        assert relay.stats.connections == 1


def test_flow_cap_refuses_new_sources_and_logs_once(
    echo: Callable[..., EchoTarget], server_logs: Any
) -> None:
    with relaying("udp://127.0.0.1:0", echo().url, max_conns=3) as relay:
        clients = [client(relay.endpoint) for _ in range(5)]
        try:
            for c in clients[:3]:
                c.send(b"in")
                assert c.recv(10) == b"in"
            for c in clients[3:]:
                c.send(b"out")
                c.send(b"out again")
                assert nothing_comes(c)
            clients[0].send(b"still")  # the open flows keep working
            assert clients[0].recv(10) == b"still"
        finally:
            for c in clients:
                c.close()
        assert relay.stats.open == 3
        assert relay.counts.dropped == 4
        assert server_logs.count("flows open (the cap") == 1


def test_target_down_is_counted_and_the_flow_survives(
    echo: Callable[..., EchoTarget], server_logs: Any
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        addr = hole.getsockname()
    # Nothing listens at addr now: each datagram there earns an ICMP port unreachable.
    with relaying("udp://127.0.0.1:0", f"udp://127.0.0.1:{addr[1]}") as relay:
        with client(relay.endpoint) as a:
            for _ in range(3):
                a.send(b"anyone?")
            wait_for(lambda: relay.counts.refused >= 1, what="ECONNREFUSED counted")
            server_logs.wait_for("refused a datagram")
            target = echo(socket.AF_INET, addr)  # the target comes up on that port
            a.send(b"now")
            assert a.recv(10) == b"now"  # the same flow, still open
            with client(relay.endpoint) as b:
                b.send(b"other")
                assert b.recv(10) == b"other"
        assert relay.stats.errors["target_refused"] >= 1
        assert relay.stats.connections == 2
        assert set(target.received) >= {b"now", b"other"}


def test_unixgram_target_absent_drops_until_it_binds(
    echo: Callable[..., EchoTarget], sock_dir: Path, server_logs: Any
) -> None:
    path = sock_dir / "later.sock"
    with relaying("udp://127.0.0.1:0", f"unixgram://{path}") as relay, client(relay.endpoint) as c:
        c.send(b"early")
        wait_for(lambda: relay.counts.refused == 1, what="the refusal counted")
        server_logs.wait_for("cannot reach")
        echo(socket.AF_UNIX, str(path))
        c.send(b"late")
        assert c.recv(10) == b"late"


# -- guards and floods -------------------------------------------------------------------


def test_deny_drops_the_source(echo: Callable[..., EchoTarget]) -> None:
    target = echo()
    with relaying("udp://127.0.0.1:0", target.url, deny=["127.0.0.0/8"]) as relay:
        with client(relay.endpoint) as c:
            c.send(b"let me in")
            assert nothing_comes(c)
        assert relay.stats.connections == 0
        assert relay.counts.dropped == 1
    assert target.received == []


def test_rate_limit_bounds_what_one_source_gets_through(echo: Callable[..., EchoTarget]) -> None:
    target = echo()
    with relaying("udp://127.0.0.1:0", target.url, udp_rate=10) as relay:
        with client(relay.endpoint) as c:
            for _ in range(200):
                c.send(b"x")
            wait_for(
                lambda: relay.counts.datagrams_up + relay.counts.dropped == 200, what="all read"
            )
        # A burst of 10 tokens, refilled at 10/s while the 200 were read.
        assert 10 <= relay.counts.datagrams_up <= 20


def test_garbage_flood_from_many_sources_is_bounded(echo: Callable[..., EchoTarget]) -> None:
    target = echo()
    with (
        relaying("udp://127.0.0.1:0", target.url, max_conns=20) as relay,
        client(relay.endpoint) as regular,
    ):
        regular.send(b"hi")
        assert regular.recv(10) == b"hi"
        flood = [client(relay.endpoint) for _ in range(200)]
        try:
            for _ in range(3):
                for s in flood:
                    s.send(os.urandom(512))
            # The regular client is still served (its marker, sent until it gets
            # through, queues behind what is left of the flood).
            regular.settimeout(0.2)
            for _ in range(50):
                regular.send(b"still here")
                with contextlib.suppress(TimeoutError):
                    if regular.recv(100) == b"still here":
                        break
            else:
                raise AssertionError("the regular client's flow stopped working")
            assert len(relay.flows) == relay.stats.open == 20
            assert relay.stats.connections == 20
            assert relay.counts.dropped > 0  # the refused sources' (those read)
        finally:
            for s in flood:
                s.close()


# -- configuration errors ----------------------------------------------------------------


def test_stream_target_for_datagram_listen_is_a_config_error(tmp_path: Path) -> None:
    lt = LoopThread()
    lst = open_listener(parse_endpoint("udp://127.0.0.1:0"), backlog=1)
    try:
        for target in ("tcp://127.0.0.1:9", f"unix://{tmp_path}/s"):
            with pytest.raises(ConfigError, match="datagram relay joins"):
                DatagramRelay(lt.loop, lst, parse_endpoint(target))
    finally:
        close_listener(lst)
        lt.close()
    with pytest.raises(ConfigError):
        Relay("udp://127.0.0.1:0", "tcp://127.0.0.1:9")
    with pytest.raises(ConfigError):
        Relay("tcp://127.0.0.1:0", "udp://127.0.0.1:9")


def test_stream_only_toxic_on_a_datagram_relay_is_refused(echo: Callable[..., EchoTarget]) -> None:
    toxics = ToxicSet([Toxic("limit_data", attributes={"bytes": 10})])
    with (
        pytest.raises(ToxicError, match="limit_data"),
        relaying("udp://127.0.0.1:0", echo().url, toxics),
    ):
        pass


# -- through Relay / RelayThread (the runner's wiring) ------------------------------------


def test_relay_thread_relays_udp(echo: Callable[..., EchoTarget]) -> None:
    target = echo()
    with RelayThread("udp://127.0.0.1:0", target.url) as relay:
        with client(relay.endpoints[0]) as c:
            c.send(b"via RelayThread")
            assert c.recv(100) == b"via RelayThread"
        assert relay.stats.bytes_up == relay.stats.bytes_down == len(b"via RelayThread")


# -- toxics, per flow and per datagram ----------------------------------------------------


def send_paced(c: socket.socket, relay: DatagramRelay, datagrams: list[bytes]) -> None:
    """Send in bursts the relay reads before the next (none lost in the kernel's buffer)."""
    start = relay.counts.datagrams_up + relay.counts.dropped
    for i in range(0, len(datagrams), 50):
        for data in datagrams[i : i + 50]:
            c.send(data)
        sent = start + min(i + 50, len(datagrams))
        wait_for(functools.partial(_read_at_least, relay, sent), what="the burst read")


def _read_at_least(relay: DatagramRelay, n: int) -> bool:
    return relay.counts.datagrams_up + relay.counts.dropped >= n


@pytest.mark.parametrize("seed", [7, None])
def test_drop_half_within_binomial_bounds(
    echo: Callable[..., EchoTarget], seed: int | None
) -> None:
    target = echo()
    toxics = ToxicSet([Toxic("drop", stream="upstream", attributes={"probability": 0.5})])
    rng = random.Random(seed) if seed is not None else None
    n = 400
    with (
        relaying("udp://127.0.0.1:0", target.url, toxics, rng=rng) as relay,
        client(relay.endpoint) as c,
    ):
        send_paced(c, relay, [b"%d" % i for i in range(n)])
        dropped = relay.applied.get("drop", 0)
        wait_for(lambda: len(target.received) == n - dropped, what="the rest at the target")
        # Binomial(400, 0.5): mean 200, sd 10; 5 sd either side (one false alarm in ~2M).
        assert 150 <= dropped <= 250
        assert target.received == sorted(target.received, key=int)  # order kept
        assert relay.counts.datagrams_up == n
    assert relay.stats.toxics["drop"] == dropped  # folded in when the flow ended


def test_duplicate_and_reorder_end_to_end(echo: Callable[..., EchoTarget]) -> None:
    target = echo()
    toxics = ToxicSet(
        [
            Toxic("reorder", stream="upstream", attributes={"probability": 1.0, "delay": 2000}),
            Toxic("duplicate", stream="downstream", attributes={"probability": 1.0}),
        ]
    )
    with (
        relaying("udp://127.0.0.1:0", target.url, toxics) as relay,
        client(relay.endpoint) as c,
    ):
        for i in range(4):
            c.send(b"%d" % i)
        got = [c.recv(10) for _ in range(8)]
        # Each datagram waits for the next and leaves after it; each reply comes twice.
        assert target.received == [b"1", b"0", b"3", b"2"]
        assert got == [b"1", b"1", b"0", b"0", b"3", b"3", b"2", b"2"]
        assert nothing_comes(c)
        assert relay.applied == {"reorder": 2, "duplicate": 4}


def test_toxicity_is_drawn_per_flow(echo: Callable[..., EchoTarget]) -> None:
    target = echo()
    toxics = ToxicSet(
        [Toxic("drop", stream="upstream", toxicity=0.5, attributes={"probability": 1.0})]
    )
    with relaying("udp://127.0.0.1:0", target.url, toxics, rng=random.Random(3)) as relay:
        clients = [client(relay.endpoint) for _ in range(40)]
        try:
            for c in clients:
                for _ in range(3):
                    c.send(b"x")
            wait_for(lambda: relay.counts.datagrams_up == 120, what="all read")
            wait_for(lambda: len(target.received) == 120 - relay.applied.get("drop", 0))
        finally:
            for c in clients:
                c.close()
        per_flow = {p: target.peers.count(p) for p in set(target.peers)}
        assert set(per_flow.values()) == {3}  # a flow drops all of its datagrams or none
        assert 5 <= len(per_flow) <= 35  # Binomial(40, 0.5): ~20 flows spared


def test_a_toxic_added_at_run_time_reaches_an_open_flow(echo: Callable[..., EchoTarget]) -> None:
    toxics = ToxicSet()
    with (
        relaying("udp://127.0.0.1:0", echo().url, toxics) as relay,
        client(relay.endpoint) as c,
    ):
        c.send(b"before")
        assert c.recv(10) == b"before"
        toxics.add(Toxic("drop", attributes={"probability": 1.0}))  # downstream
        wait_for(lambda: all(f.down is not None for f in relay.flows.values()), what="piped")
        c.send(b"during")
        assert nothing_comes(c)
        toxics.remove("drop_downstream")
        wait_for(lambda: all(f.down.passthrough for f in relay.flows.values() if f.down))
        c.send(b"after")
        assert c.recv(10) == b"after"
        assert relay.stats.connections == 1


def test_latency_per_datagram(echo: Callable[..., EchoTarget]) -> None:
    toxics = ToxicSet([Toxic("latency", attributes={"latency": 100})])
    with (
        relaying("udp://127.0.0.1:0", echo().url, toxics) as relay,
        client(relay.endpoint) as c,
    ):
        for _ in range(3):
            start = time.monotonic()
            c.send(b"ping")
            assert c.recv(10) == b"ping"
            took = time.monotonic() - start
            assert 0.1 <= took < 0.1 + 0.5, took  # behaviour, with a loaded machine's slack
