"""The stream relay on real sockets: a textbook client, the relay, a textbook server.

Bytes both ways over each pair of transports, half-close and reset each way, backpressure
each way (a side that never reads costs bounded memory in the relay), a target that is
down or never answers, exec: targets, TLS on either side, and the server's limits.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from relay_helpers import OnePeer, connect, read_to_eof, reset_close
from support import wait_for

from sockserve.relay import Relay, RelayThread
from sockserve.server import ServerThread

Serve = Callable[..., ServerThread]
StartRelay = Callable[..., RelayThread]
LOOPS = ["uvloop", "asyncio"]


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def echo_once(conn: socket.socket) -> bytes:
    """Echo everything until EOF, then return what came."""
    got = b""
    while data := conn.recv(65536):
        got += data
        conn.sendall(data)
    return got


@pytest.mark.parametrize(
    ("listen", "target"),
    [("tcp", "tcp"), ("tcp", "unix"), ("unix", "tcp"), ("ipv6", "ipv6"), ("tcp", "ipv6")],
)
def test_bytes_both_ways_over_each_pair(
    sockserve_relay: StartRelay, sock_dir: Path, listen: str, target: str
) -> None:
    if "ipv6" in (listen, target) and not has_ipv6():
        pytest.skip("no IPv6 loopback")
    where: dict[str, Any] = {"tcp": "127.0.0.1", "unix": sock_dir / "t.sock", "ipv6": "::1"}
    peer = OnePeer(echo_once, where[target])
    urls = {
        "tcp": "tcp://127.0.0.1:0",
        "unix": f"unix://{sock_dir}/l.sock",
        "ipv6": "tcp://[::1]:0",
    }
    relay = sockserve_relay(peer.url, listen=urls[listen])
    payload = bytes(range(256)) * 400  # 100 KiB, every byte value
    with connect(relay.url()) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        assert read_to_eof(c) == payload
    assert peer.result() == payload
    wait_for(lambda: relay.stats.open == 0, what="the relayed connection to end")
    assert relay.stats.bytes_up == relay.stats.bytes_down == len(payload)
    assert relay.stats.connections == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_half_close_from_the_client_reaches_the_target_and_the_reply_still_arrives(
    sockserve_relay: StartRelay, loop: str
) -> None:
    def target(conn: socket.socket) -> bytes:
        got = read_to_eof(conn)  # only ends if the client's FIN came through
        conn.sendall(b"you sent %d bytes" % len(got))
        return got

    peer = OnePeer(target)
    relay = sockserve_relay(peer.url, loop_kind=loop)
    with connect(relay.url()) as c:
        c.sendall(b"x" * 5000)
        c.shutdown(socket.SHUT_WR)
        assert read_to_eof(c) == b"you sent 5000 bytes"
    assert peer.result() == b"x" * 5000


@pytest.mark.parametrize("loop", LOOPS)
def test_half_close_from_the_target_reaches_the_client_which_may_still_send(
    sockserve_relay: StartRelay, loop: str
) -> None:
    def target(conn: socket.socket) -> bytes:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        return read_to_eof(conn)

    peer = OnePeer(target)
    relay = sockserve_relay(peer.url, loop_kind=loop)
    with connect(relay.url()) as c:
        assert read_to_eof(c) == b"banner"  # the target's FIN arrived as our EOF
        c.sendall(b"still talking")
        c.shutdown(socket.SHUT_WR)
        assert peer.result() == b"still talking"
        assert c.recv(10) == b""


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_reset_reaches_the_target_as_a_reset(
    sockserve_relay: StartRelay, loop: str
) -> None:
    first = threading.Event()

    def target(conn: socket.socket) -> str:
        assert conn.recv(100) == b"hello"
        first.set()
        try:
            data = conn.recv(100)
        except ConnectionResetError:
            return "reset"
        return f"got {data!r}"

    peer = OnePeer(target)
    relay = sockserve_relay(peer.url, loop_kind=loop)
    c = connect(relay.url())
    c.sendall(b"hello")
    assert first.wait(10)
    reset_close(c)
    assert peer.result() == "reset"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_target_reset_reaches_the_client_as_a_reset(
    sockserve_relay: StartRelay, loop: str
) -> None:
    def target(conn: socket.socket) -> None:
        conn.recv(100)
        reset_close(conn)

    peer = OnePeer(target)
    relay = sockserve_relay(peer.url, loop_kind=loop)
    with connect(relay.url()) as c:
        c.sendall(b"hello")
        peer.result()
        with pytest.raises(ConnectionResetError):
            c.recv(100)
    wait_for(lambda: relay.stats.errors.get("target_reset") == 1, what="the reset counted")


def relay_buffers(relay: Relay) -> tuple[int, int] | None:
    """Bytes waiting in the relay's write buffers (towards the client, towards the target)
    of a connection on the session path; None on another path (relayfast's pump)."""
    assert relay.server is not None
    conns = [c for rt in relay.server.streams for c in rt.conns]
    assert len(conns) == 1, conns
    conn: Any = conns[0]
    if not hasattr(conn, "session"):
        return None
    far = conn.session.far
    return conn._transport.get_write_buffer_size(), far.transport.get_write_buffer_size()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("stalled", ["client", "target"])
def test_a_side_that_never_reads_costs_bounded_memory(
    sockserve_relay: StartRelay, loop: str, stalled: str
) -> None:
    """64 MiB offered to a side that does not read: the sender stalls, the relay holds at
    most its high-water mark per direction (plus one read), and once the side reads,
    every byte arrives in order."""
    total = 64 * 1024 * 1024
    chunk = bytes(range(256)) * 256  # 64 KiB
    sent = [0]
    go = threading.Event()

    def pump(sock: socket.socket) -> None:
        while sent[0] < total:
            sock.sendall(chunk)
            sent[0] += len(chunk)

    def count(sock: socket.socket) -> int:
        n = 0
        while data := sock.recv(1 << 20):
            assert data[:1] == bytes([n % 256])  # in order
            n += len(data)
        return n

    def target(conn: socket.socket) -> int:
        if stalled == "target":
            assert go.wait(30)
            return count(conn)
        pump(conn)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
        return 0

    peer = OnePeer(target, timeout=60)
    high = 256 * 1024
    relay = sockserve_relay(peer.url, loop_kind=loop, write_high_water=high)
    c = connect(relay.url(), timeout=60)
    sender = None
    if stalled == "target":

        def send_all() -> None:
            pump(c)
            c.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
    # The sender stalls: what it has sent stops growing, well short of the total.
    last, still = -1, 0
    deadline = time.monotonic() + 30
    while still < 40 and time.monotonic() < deadline:
        still = still + 1 if sent[0] == last else 0
        last = sent[0]
        time.sleep(0.01)
    assert sent[0] < total // 2, "the sender never stalled: nothing holds it back"
    buffers = relay_buffers(relay.relay)
    if buffers is not None:
        to_client, to_target = buffers
        held = to_client if stalled == "client" else to_target
        assert held <= high + 1024 * 1024, buffers
    if stalled == "client":
        assert count(c) == total
    else:
        go.set()
        assert sender is not None
        sender.join(60)
        assert peer.result(60) == total
    c.close()


def test_target_down_resets_the_client_and_logs_one_line(
    sockserve_relay: StartRelay, server_logs: Any
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    relay = sockserve_relay(f"127.0.0.1:{dead}")
    _reset_at_once(relay.url())
    server_logs.wait_for(f"cannot connect to tcp://127.0.0.1:{dead}")
    [line] = [m for m in server_logs.messages() if "cannot connect" in m]
    assert "[Errno 111]" in line  # ECONNREFUSED, however the path words it
    assert relay.stats.errors == {"connect": 1}


def test_connect_timeout_resets_the_client(sockserve_relay: StartRelay, server_logs: Any) -> None:
    # A listener that never accepts, its backlog full: further SYNs go unanswered.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    waiting = []
    for _ in range(3):
        w = socket.socket()
        w.setblocking(False)
        w.connect_ex(full.getsockname())
        waiting.append(w)
    try:
        relay = sockserve_relay(f"tcp://127.0.0.1:{full.getsockname()[1]}", connect_timeout=0.3)
        with connect(relay.url()) as c:
            started = time.monotonic()
            with pytest.raises(ConnectionResetError):
                c.recv(100)
            assert time.monotonic() - started < 5
        server_logs.wait_for("no connection within 0.3s (--connect-timeout)")
    finally:
        for w in waiting:
            w.close()
        full.close()


def test_exec_cat_echoes_and_half_closes(sockserve_relay: StartRelay) -> None:
    relay = sockserve_relay("exec:cat")
    with connect(relay.url()) as c:
        c.sendall(b"through cat\n")
        c.shutdown(socket.SHUT_WR)
        assert read_to_eof(c) == b"through cat\n"


def test_exec_program_sees_the_peer_address(sockserve_relay: StartRelay) -> None:
    relay = sockserve_relay(
        "exec:sh -c 'echo $SOCAT_PEERADDR $SOCAT_PEERPORT $REMOTE_ADDR $REMOTE_PORT'"
    )
    with connect(relay.url()) as c:
        host, port = c.getsockname()[:2]
        assert read_to_eof(c).split() == [host.encode(), b"%d" % port] * 2


def test_exec_that_cannot_start_closes_only_that_connection(
    sockserve_relay: StartRelay, server_logs: Any, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-program"
    relay = sockserve_relay(f"exec:{missing}")
    _reset_at_once(relay.url())
    server_logs.wait_for(f"cannot start '{missing}'")
    ok = sockserve_relay("exec:cat")  # the relay process goes on
    with connect(ok.url()) as c:
        c.sendall(b"ok")
        c.shutdown(socket.SHUT_WR)
        assert read_to_eof(c) == b"ok"
    # and so does the failing relay, for the next client
    _reset_at_once(relay.url())


def _reset_at_once(url: str) -> None:
    """The relay resets a client whose program cannot start: maybe before its connect
    call has returned (the reset lands while it sets the socket up), maybe at its read."""
    with pytest.raises(ConnectionResetError), connect(url) as c:
        c.recv(100)


def test_exec_program_is_killed_when_the_client_leaves(
    sockserve_relay: StartRelay, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    relay = sockserve_relay(f"exec:sh -c 'echo $$ > {pidfile}; exec sleep 60'")
    c = connect(relay.url())
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "", what="the pid")
    pid = int(pidfile.read_text())
    reset_close(c)  # gone for good (a FIN alone is a half-close: the program may still reply)

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    wait_for(gone, what="the program to be killed")


def test_tls_origination_to_a_real_tls_server(
    sockserve_relay: StartRelay, serve: Serve, certs: Any
) -> None:
    srv = serve("echo", "tls://127.0.0.1:0", tls_cert=certs.server_cert, tls_key=certs.server_key)
    relay = sockserve_relay(srv.url("tls"), tls_ca=certs.ca)
    with connect(relay.url()) as c:
        c.sendall(b"in the clear here, encrypted beyond")
        assert c.recv(100) == b"in the clear here, encrypted beyond"


def test_tls_origination_refuses_a_server_it_cannot_verify(
    sockserve_relay: StartRelay, serve: Serve, certs: Any, server_logs: Any
) -> None:
    srv = serve("echo", "tls://127.0.0.1:0", tls_cert=certs.server_cert, tls_key=certs.server_key)
    relay = sockserve_relay(srv.url("tls"))  # no --tls-ca: the test CA is not trusted
    _reset_at_once(relay.url())
    server_logs.wait_for("CERTIFICATE_VERIFY_FAILED")


def test_tls_termination_with_mutual_tls(sockserve_relay: StartRelay, certs: Any) -> None:
    peer = OnePeer(echo_once)
    relay = sockserve_relay(
        peer.url,
        listen="tls://127.0.0.1:0",
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    )
    import ssl

    ctx = ssl.create_default_context(cafile=certs.ca)
    port = relay.endpoints[0].port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        ctx.load_cert_chain(certs.client_cert, certs.client_key)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as c:
            c.sendall(b"mutual")
            assert c.recv(100) == b"mutual"
    bare = ssl.create_default_context(cafile=certs.ca)  # no client certificate: refused
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(OSError),  # ssl.SSLError and ConnectionResetError are OSErrors
        bare.wrap_socket(raw, server_hostname="127.0.0.1") as c,
    ):
        c.sendall(b"x")
        if not c.recv(100):
            raise OSError("closed")


def test_max_conns_holds_the_next_client_until_one_closes(
    sockserve_relay: StartRelay, serve: Serve
) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    relay = sockserve_relay(srv.url("tcp"), max_conns=1)
    with connect(relay.url()) as first:
        first.sendall(b"one")
        assert first.recv(10) == b"one"
        second = connect(relay.url())
        second.sendall(b"two")
        second.settimeout(0.3)
        with pytest.raises(TimeoutError):
            second.recv(10)  # waiting in the backlog: not relayed yet
    second.settimeout(10)
    assert second.recv(10) == b"two"
    second.close()


def test_deny_refuses_before_anything_reaches_the_target(
    sockserve_relay: StartRelay, server_logs: Any
) -> None:
    peer = OnePeer(echo_once, timeout=2)
    relay = sockserve_relay(peer.url, deny=["127.0.0.0/8"])
    with connect(relay.url()) as c, contextlib.suppress(ConnectionResetError):
        assert c.recv(10) == b""
    assert not peer.accepted.wait(0.5)
    assert relay.stats.connections == 0


def test_send_proxy_v1_names_the_client(sockserve_relay: StartRelay) -> None:
    peer = OnePeer(lambda conn: conn.recv(200))
    relay = sockserve_relay(peer.url, send_proxy=1)
    with connect(relay.url()) as c:
        c.sendall(b"payload")
        got = peer.result()
        host, port = c.getsockname()
    rport = relay.endpoints[0].port
    assert got.startswith(f"PROXY TCP4 {host} 127.0.0.1 {port} {rport}\r\n".encode())


def test_trace_dumps_both_directions(
    sockserve_relay: StartRelay, serve: Serve, server_logs: Any
) -> None:
    srv = serve("echo", "tcp://127.0.0.1:0")
    relay = sockserve_relay(srv.url("tcp"), trace=True)
    with connect(relay.url()) as c:
        c.sendall(b"traced!")
        assert c.recv(10) == b"traced!"
    server_logs.wait_for("relayed to target from")
    server_logs.wait_for("relayed from target to")
    assert any("|traced!|" in m for m in server_logs.messages())


def test_relay_in_a_coroutine() -> None:
    import asyncio

    async def main() -> bytes:
        with socket.socket() as ls:
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            async with Relay("tcp://127.0.0.1:0", f"127.0.0.1:{ls.getsockname()[1]}") as r:
                reader, writer = await asyncio.open_connection(
                    r.endpoints[0].host, r.endpoints[0].port
                )
                conn = await asyncio.get_running_loop().run_in_executor(None, ls.accept)
                with conn[0] as t:
                    t.sendall(b"async")
                    data = await asyncio.wait_for(reader.readexactly(5), 10)
                writer.close()
                return data

    assert asyncio.run(main()) == b"async"


def test_idle_timeout_closes_both_sides(sockserve_relay: StartRelay) -> None:
    peer = OnePeer(read_to_eof)
    relay = sockserve_relay(peer.url, idle_timeout=0.3)
    with connect(relay.url()) as c:
        c.sendall(b"then silence")
        assert read_to_eof(c) == b""  # closed by the relay, not by us
    assert peer.result() == b"then silence"  # and the target saw the close


def test_proxy_protocol_on_listen_passes_the_real_client_on(sockserve_relay: StartRelay) -> None:
    from sockserve.framing.proxy import encode_v1

    peer = OnePeer(read_to_eof)
    relay = sockserve_relay(peer.url, proxy_protocol=True, send_proxy=1)
    with connect(relay.url()) as c:
        c.sendall(encode_v1(("192.0.2.7", 4242), ("198.51.100.1", 80)) + b"payload")
        c.shutdown(socket.SHUT_WR)
        got = peer.result()
    assert got.startswith(b"PROXY TCP4 192.0.2.7 127.0.0.1 4242 "), got
    assert got.endswith(b"\r\npayload")
