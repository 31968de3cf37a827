"""Issue 14: one test per README promise that a one-line bug could break unnoticed.

Each test names the deliberate bug (mutation) it was checked against: the bug was made
by hand in src/, the test went red, the bug was reverted (see docs/testing.md).
"""

from __future__ import annotations

import calendar
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import LoggedServer, addr_of
from support import SOCKSERVE, ServerProcess, run_cli

import sockserve
from sockserve.errors import MessageTooLarge, RequestTimeout
from sockserve.framing.length import LengthCodec
from sockserve.server import ServerThread

pytestmark = pytest.mark.timeout(90)
Serve = Callable[..., ServerThread]
TESTS = Path(__file__).resolve().parents[1]


def _tcp(url: str, timeout: float = 5) -> socket.socket:
    return socket.create_connection(addr_of(url), timeout=timeout)


def _closed_within(s: socket.socket, limit: float) -> float:
    """Seconds until the peer closes ``s`` (fails past ``limit``)."""
    start = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(4096):
            pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


# -- --idle-timeout ------------------------------------------------------------------------


def test_cli_idle_timeout_closes_an_idle_connection_on_time() -> None:
    """Mutation: the timeout 10x longer (0.5 s becomes 5 s)."""
    with ServerProcess("timestamp", "--listen", "tcp://127.0.0.1:0", "--idle-timeout", "0.5") as p:
        with _tcp(p.url("tcp")) as s:
            s.sendall(b"hi")
            assert s.recv(1024).endswith(b"hi")
            took = _closed_within(s, 4.0)
        assert 0.4 <= took <= 2.5, took


def test_cli_idle_timeout_0_means_never() -> None:
    """Mutation: 0 taken as a (tiny) timeout instead of 'never'."""
    args = ("--listen", "tcp://127.0.0.1:0", "--idle-timeout", "0")
    with ServerProcess("timestamp", *args) as p, _tcp(p.url("tcp")) as s:
        s.sendall(b"one")
        assert s.recv(1024).endswith(b"one")
        r, _, _ = select.select([s], [], [], 1.5)  # idle: nothing must arrive, not even EOF
        assert r == []
        s.sendall(b"two")
        assert s.recv(1024).endswith(b"two")


def test_idle_sweep_spares_a_connection_whose_request_is_still_running(tmp_path: Path) -> None:
    """Mutation: the sweep closes a connection whose request runs longer than the timeout."""
    gate = tmp_path / "release"
    with (
        LoggedServer(
            "fault_services:gated",
            "--listen",
            "tcp://127.0.0.1:0",
            "--framing",
            "line",
            "--idle-timeout",
            "0.3",
            env={"FAULT_GATE": str(gate)},
        ) as srv,
        socket.create_connection(srv.addr("tcp"), timeout=5) as s,
    ):
        s.sendall(b"slow\n")
        srv.wait_line("gated start")
        r, _, _ = select.select([s], [], [], 1.2)  # 4 idle timeouts while it runs
        assert r == [], "closed (or answered) while the request was still running"
        gate.touch()
        assert s.recv(1024) == b"done slow\n"


# -- drain on SIGTERM ----------------------------------------------------------------------


def test_sigterm_drain_answers_pipelined_requests_already_received(tmp_path: Path) -> None:
    """Mutation: the drain throws away what was received but not started (a\\nb\\nc\\n
    answered a only)."""
    gate = tmp_path / "release"
    with LoggedServer(
        "fault_services:gated",
        "--listen",
        "tcp://127.0.0.1:0",
        "--framing",
        "line",
        env={"FAULT_GATE": str(gate)},
    ) as srv:
        with socket.create_connection(srv.addr("tcp"), timeout=10) as s:
            s.sendall(b"a\nb\nc\n")
            srv.wait_line("gated start a")
            srv.signal(signal.SIGTERM)
            srv.wait_line("SIGTERM received")
            gate.touch()
            got = b""
            while got.count(b"\n") < 3:
                chunk = s.recv(1024)
                assert chunk, f"closed after {got!r}; log:\n{srv.log}"
                got += chunk
            assert got == b"done a\ndone b\ndone c\n"
        rc, log = srv.wait(20)
    assert rc == 0, log


# -- --max-message -------------------------------------------------------------------------


def test_length_codec_takes_exactly_max_and_refuses_max_plus_one() -> None:
    """Mutation: the length codec accepting max+1 bytes."""
    ok = LengthCodec(1000)
    ok.feed((1000).to_bytes(4, "big") + b"x" * 1000)
    assert ok.next_message() == b"x" * 1000
    with pytest.raises(MessageTooLarge):
        LengthCodec(1000).feed((1001).to_bytes(4, "big"))


def _read_n(s: socket.socket, n: int, wait: float = 3) -> bytes:
    """Up to ``n`` bytes, whatever arrives within ``wait`` seconds."""
    got = b""
    s.settimeout(wait)
    try:
        while len(got) < n and (chunk := s.recv(65536)):
            got += chunk
    except TimeoutError:
        pass
    return got


@pytest.mark.parametrize("pure", ["0", "1"])
def test_raw_chunk_over_max_message_is_split_into_two_requests(pure: str) -> None:
    """Mutation: the C raw fast path answering a 1001-byte chunk under --max-message 1000
    as one request (docs/reliability.md: raw chunks longer than the cap are split). Both
    builds: the C path and SOCKSERVE_PURE_PYTHON=1. Each timestamp reply is 27 + request."""
    with (
        ServerProcess(
            "timestamp",
            "--listen",
            "tcp://127.0.0.1:0",
            "--max-message",
            "1000",
            env={"SOCKSERVE_PURE_PYTHON": "1" if pure == "1" else ""},  # "0" would turn it off too
        ) as p,
        _tcp(p.url("tcp")) as s,
    ):
        # The first request goes through the Python path; the connection then qualifies
        # for the C fast path (raw framing, a sync handler, nothing queued).
        s.sendall(b"first")
        assert _read_n(s, 27 + 5).endswith(b"] first")
        s.sendall(b"z" * 1001)
        got = _read_n(s, 2 * 27 + 1001)
    assert got.count(b"] z") == 2, got[:80]
    assert len(got) == 2 * 27 + 1001


# -- local time ----------------------------------------------------------------------------

IST = "IST-5:30"  # POSIX TZ (Asia/Kolkata's offset, no DST): needs no tzdata


def _ctime_to_epoch(text: str, utc_offset: int) -> float:
    return calendar.timegm(time.strptime(text, "%a %b %d %H:%M:%S %Y")) - utc_offset


@pytest.mark.parametrize("name", ["timestamp", "daytime"])
def test_timestamp_and_daytime_use_the_servers_local_time(name: str) -> None:
    """Mutation: timestamp/daytime formatted in UTC instead of local time (the machine runs
    in UTC, so the server runs under TZ=IST-5:30)."""
    with (
        ServerProcess(name, "--listen", "tcp://127.0.0.1:0", env={"TZ": IST}) as p,
        _tcp(p.url("tcp")) as s,
    ):
        s.sendall(b"when")
        reply = s.recv(1024)
    text = reply.decode().strip()
    stamp = text[1:25] if name == "timestamp" else text
    assert abs(_ctime_to_epoch(stamp, 5 * 3600 + 1800) - time.time()) <= 3, reply


# -- the UDP client's retransmissions -------------------------------------------------------


def test_udp_client_retries_after_half_a_second_then_doubling() -> None:
    """Mutation: retrying every 0.05 s instead of 0.5 s, doubling."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        url = f"udp://127.0.0.1:{sink.getsockname()[1]}"
        with pytest.raises(RequestTimeout), sockserve.connect(url, timeout=2.0) as c:
            c.request(b"anyone?")
        arrivals = []
        sink.settimeout(0)
        while True:
            try:
                sink.recv(100)
            except BlockingIOError:
                break
            arrivals.append(time.monotonic())
    # Sent at 0, 0.5 and 1.5 s (then the 2 s are spent): three copies.
    assert len(arrivals) == 3, len(arrivals)


def test_udp_client_retry_times() -> None:
    """The same, observed as they happen: the gaps are about 0.5 s then 1 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(5)
        port = sink.getsockname()[1]
        code = (
            "import sockserve, sys\n"
            "try:\n"
            f"    sockserve.connect('udp://127.0.0.1:{port}', timeout=2.0).request(b'x')\n"
            "except sockserve.errors.RequestTimeout:\n"
            "    sys.exit(0)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code])
        try:
            times = []
            for _ in range(3):
                sink.recv(10)
                times.append(time.monotonic())
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    gaps = [times[1] - times[0], times[2] - times[1]]
    assert 0.4 <= gaps[0] <= 0.8 and 0.9 <= gaps[1] <= 1.4, gaps


# -- the CLI passes every guard and limit on ----------------------------------------------


def test_cli_max_conns_holds_the_second_client_until_the_first_leaves() -> None:
    """Mutation: the CLI dropping --max-conns."""
    with ServerProcess("timestamp", "--listen", "tcp://127.0.0.1:0", "--max-conns", "1") as p:
        first = _tcp(p.url("tcp"))
        first.sendall(b"first")
        assert first.recv(1024).endswith(b"first")
        with _tcp(p.url("tcp")) as second:  # completes in the kernel's backlog
            second.sendall(b"second")
            r, _, _ = select.select([second], [], [], 0.8)
            assert r == [], "a second connection was served past --max-conns 1"
            first.close()
            second.settimeout(5)
            assert second.recv(1024).endswith(b"second")


def test_cli_udp_rate_limits_a_source() -> None:
    """Mutation: the CLI dropping --udp-rate (loopback is unlimited by default)."""
    args = ("--listen", "udp://127.0.0.1:0", "--udp-rate", "5")
    with (
        ServerProcess("timestamp", *args) as p,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
    ):
        start = time.monotonic()
        for i in range(60):
            s.sendto(b"%d" % i, addr_of(p.url("udp")))
        s.settimeout(0.3)
        replies = 0
        try:
            while s.recv(1024):
                replies += 1
        except TimeoutError:
            pass
        elapsed = time.monotonic() - start
    assert 1 <= replies <= 5 + 5 * elapsed + 1, (replies, elapsed)


def _ask_from(port: int, url: str, wait: float) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
        s.settimeout(wait)
        s.sendto(b"q", addr_of(url))
        try:
            return s.recv(2048)
        except TimeoutError:
            return None


def test_cli_udp_min_source_port(netns: str) -> None:
    """Mutation: the CLI dropping --udp-min-source-port (fixed source ports are free in
    the test's own network namespace)."""
    with ServerProcess(
        "timestamp", "--listen", "udp://127.0.0.1:0", "--udp-min-source-port", "3000"
    ) as p:
        assert _ask_from(2999, p.url("udp"), 0.5) is None
        reply = _ask_from(3000, p.url("udp"), 5)
        assert reply is not None and reply.endswith(b"] q")


def test_cli_udp_amplify_lets_a_remote_source_have_the_whole_reply(netns: str) -> None:
    """Mutation: the CLI dropping --udp-amplify. The source is 192.0.2.1, which exists only
    in the test's network namespace."""
    for flags, short in (((), True), (("--udp-amplify",), False)):
        with (
            ServerProcess("qotd", "--listen", f"udp://{netns}:0", *flags) as p,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s,
        ):
            s.bind((netns, 0))
            s.settimeout(5)
            s.sendto(b"??", addr_of(p.url("udp")))
            reply = s.recv(2048)
        assert (len(reply) == 2) is short, (flags, reply)


def _completed_connects(addr: tuple[str, int], n: int) -> int:
    """Start ``n`` non-blocking connects; how many complete within 0.5 s."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(addr)
            socks.append(s)
        time.sleep(0.5)  # SYNs past the backlog are dropped: they do not complete this soon
        _, w, _ = select.select([], socks, [], 0)
        return sum(1 for s in w if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
    finally:
        for s in socks:
            s.close()


def test_cli_backlog_bounds_the_kernels_queue() -> None:
    """Mutation: the CLI dropping --backlog (65535 instead of 2)."""
    with (
        ServerProcess(
            "timestamp", "--listen", "tcp://127.0.0.1:0", "--max-conns", "1", "--backlog", "2"
        ) as p,
        _tcp(p.url("tcp")) as holder,
    ):
        holder.sendall(b"hold")
        assert holder.recv(1024).endswith(b"hold")
        done = _completed_connects(addr_of(p.url("tcp")), 30)
    assert done <= 2 + 2, done  # Linux queues backlog + 1


# -- the client CLIs' exit codes ------------------------------------------------------------


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: nothing listens there


def test_call_exits_3_when_unreachable() -> None:
    r = run_cli("call", f"tcp://127.0.0.1:{_dead_port()}", "x")
    assert r.returncode == 3, r
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr


def test_bench_exits_3_when_unreachable() -> None:
    r = run_cli("bench", f"tcp://127.0.0.1:{_dead_port()}", "-n", "5", "-q")
    assert r.returncode == 3, r
    assert b"Traceback" not in r.stderr


# -- the pure-Python build -----------------------------------------------------------------


def test_pure_python_stream_recv_into_fills_the_buffer() -> None:
    """Mutation: fastio.stream_recv_into wired to a function that never fills the buffer.
    Checked through the module's own wiring, under SOCKSERVE_PURE_PYTHON=1."""
    code = (
        "import socket; from sockserve._engine import fastio\n"
        "assert not fastio.HAVE_SPEEDUPS\n"
        "a, b = socket.socketpair(); a.sendall(b'hello')\n"
        "buf = bytearray(16); n = fastio.stream_recv_into(b.fileno(), buf)\n"
        "print(n, bytes(buf[:n]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SOCKSERVE_PURE_PYTHON": "1"},
        capture_output=True,
        timeout=20,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5 b'hello'"


def test_pure_python_bench_line_framing_completes(serve: Serve) -> None:
    """SOCKSERVE_PURE_PYTHON=1 sockserve bench --framing line (it hung with the bug above)."""
    st = serve("timestamp", "tcp://127.0.0.1:0", framing="line")
    r = subprocess.run(
        [*SOCKSERVE, "bench", st.url("tcp"), "--framing", "line", "-n", "200", "-c", "2", "-q"],
        env={**os.environ, "SOCKSERVE_PURE_PYTHON": "1"},
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
