"""Issue 10, the clients (items 4, 18-23, 26, 27, 29, 30): `call`, `chat`, `bench` and
connect()/aconnect() on real loopback sockets, each bounded in time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import SOCKSERVE, run_cli, wait_for

import sockserve
from sockserve.server import ServerThread

pytestmark = pytest.mark.timeout(60)

Serve = Callable[..., ServerThread]
TESTS = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}


def no_traceback(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err and "Exception ignored" not in err, err
    return err


def fault(serve: Serve, name: str, *urls: str, **options: object) -> ServerThread:
    sys.path.insert(0, TESTS) if TESTS not in sys.path else None
    import fault_services

    return serve(getattr(fault_services, name), *urls, **options)


# -- a server that trickles one byte every 0.5 s and never finishes ----------------------


@pytest.fixture
def trickler() -> Iterator[tuple[str, int]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def drip(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.5)
            with contextlib.suppress(OSError):
                conn.recv(1024)
            while not stop.wait(0.5):
                try:
                    conn.send(b"x")
                except OSError:
                    return

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=drip, args=(conn,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield srv.getsockname()
    stop.set()
    t.join(5)
    srv.close()


# -- item 4: deadlines ----------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["line", "raw", "length"])
def test_call_timeout_is_a_deadline_for_the_whole_request(
    trickler: tuple[str, int], framing: str
) -> None:
    host, port = trickler
    t0 = time.monotonic()
    try:
        proc = run_cli(
            "call", "--timeout", "1", "--framing", framing, f"tcp://{host}:{port}", "hi", timeout=6
        )
    except subprocess.TimeoutExpired:
        pytest.fail("call --timeout 1 still running after 6 s against a trickling server")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 4, proc.stderr
    assert elapsed < 3.0, elapsed
    no_traceback(proc)


def test_api_timeouts_are_deadlines(trickler: tuple[str, int]) -> None:
    host, port = trickler
    url = f"tcp://{host}:{port}"
    t0 = time.monotonic()
    with (
        sockserve.connect(url, framing="line", timeout=1) as c,
        pytest.raises(sockserve.RequestTimeout),
    ):
        c.request(b"hi")
    assert time.monotonic() - t0 < 2.5

    async def go() -> None:
        async with sockserve.aconnect(url, framing="line", timeout=1) as c:
            with pytest.raises(sockserve.RequestTimeout):
                await c.request(b"hi")

    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(go(), 10))
    assert time.monotonic() - t0 < 2.5


def test_bench_duration_ends_on_time_against_a_trickler(trickler: tuple[str, int]) -> None:
    host, port = trickler
    for framing in ("line", "raw"):
        t0 = time.monotonic()
        try:
            proc = run_cli(
                "bench", f"tcp://{host}:{port}", "-d", "1", "--timeout", "1", "-c", "2", "-q",
                "--framing", framing, timeout=8,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"bench -d 1 --framing {framing} still running after 8 s")
        assert time.monotonic() - t0 < 4.0
        no_traceback(proc)


# -- item 18: raw replies are never cut or mis-assigned ----------------------------------


def test_call_prints_a_whole_million_byte_raw_reply(serve: Serve) -> None:
    st = fault(serve, "million", "tcp://127.0.0.1:0")
    url = st.url("tcp")
    proc = run_cli("call", url, "hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"m" * 999_999 + b"\n"
    # Several raw requests: each gets its whole reply, none gets the rest of another's.
    proc = run_cli("call", url, input=b"a\nb\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (b"m" * 999_999 + b"\n") * 2


def test_api_raw_reply_is_whole_or_refused(serve: Serve) -> None:
    st = fault(serve, "million", "tcp://127.0.0.1:0")
    with sockserve.connect(st.url("tcp"), timeout=5, max_message=2_000_000) as c:
        assert c.request(b"one") == b"m" * 999_999 + b"\n"
        assert c.request(b"two") == b"m" * 999_999 + b"\n"  # not the rest of the first
    with (
        sockserve.connect(st.url("tcp"), timeout=5) as c,
        pytest.raises(sockserve.ReplyTooLarge, match="65536"),
    ):
        c.request(b"capped")

    async def go() -> None:
        async with sockserve.aconnect(st.url("tcp"), timeout=5, max_message=2_000_000) as c:
            assert await c.request(b"one") == b"m" * 999_999 + b"\n"
            assert await c.request(b"two") == b"m" * 999_999 + b"\n"

    asyncio.run(go())


def test_call_reply_size_shares_one_connection_and_fails_loudly(serve: Serve) -> None:
    st = fault(serve, "sized", "tcp://127.0.0.1:0")
    url = st.url("tcp")
    proc = run_cli("call", "--reply-size", "1000", url, input=b"1000\n1000\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (b"s" * 1000 + b"\n") * 2
    # Replies longer than --reply-size: a loud failure, never exit 0 with a wrong reply.
    proc = run_cli("call", "--reply-size", "10", "--timeout", "2", url, input=b"30\n30\n")
    assert proc.returncode != 0
    assert "reply-size" in no_traceback(proc)


def test_client_max_message_applies_to_udp(serve: Serve) -> None:
    st = fault(serve, "sized", "udp://127.0.0.1:0")
    url = st.url("udp")
    proc = run_cli("call", "--max-message", "100", url, "1000")
    assert proc.returncode == 1
    assert "--max-message" in no_traceback(proc)
    proc = run_cli("call", "--max-message", "1000", url, "1000")
    assert proc.returncode == 0 and proc.stdout == b"s" * 1000 + b"\n"


# -- item 19: TLS files -----------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--tls-ca", "--tls-cert", "--tls-key"])
def test_missing_tls_file_names_it(tmp_path: Path, option: str) -> None:
    missing = str(tmp_path / "nope.pem")
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    url = f"tls://127.0.0.1:{lsock.getsockname()[1]}"
    try:
        for cmd in (
            ["call", option, missing, url, "x"],
            ["bench", option, missing, url, "-n", "1"],
        ):
            proc = run_cli(*cmd)
            assert proc.returncode == 2, (cmd, proc.stderr)
            err = no_traceback(proc)
            assert missing in err and "socket file" not in err
        with pytest.raises(sockserve.TLSFileError) as info:
            sockserve.connect(url, **{option[2:].replace("-", "_"): missing})
        assert info.value.path == missing
    finally:
        lsock.close()


# -- item 20: no tracebacks ---------------------------------------------------------------


def test_call_sends_the_arguments_bytes(serve: Serve) -> None:
    st = serve("echo", "tcp://127.0.0.1:0")
    proc = subprocess.run(
        [*SOCKSERVE, "call", st.url("tcp"), b"\xff\xfe"], capture_output=True, timeout=20
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"\xff\xfe\n"


def test_bench_into_a_closed_pipe(serve: Serve) -> None:
    st = serve("echo", "tcp://127.0.0.1:0")
    proc = subprocess.run(
        f"{' '.join(SOCKSERVE)} bench {st.url('tcp')} -n 200 -c 2 | true",
        shell=True, capture_output=True, timeout=30,
    )  # fmt: skip
    no_traceback(proc)


def _sh(cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, shell=True, capture_output=True, timeout=timeout, check=False)


def test_call_error_paths_are_one_line(serve: Serve) -> None:
    st = serve("echo", "tcp://127.0.0.1:0")
    url = st.url("tcp")
    cli = " ".join(SOCKSERVE)
    cases = {
        f"{cli} call {url} hi >&-": 1,  # stdout closed
        f"{cli} call {url} hi > /dev/full": 1,  # disk full
        f"{cli} call {url} <&-": 2,  # stdin closed, no TEXT
        f"{cli} call tcp://127.0.0.1:99999 hi": 2,
        f"{cli} call nonsense hi": 2,
        f"{cli} call tcp://127.0.0.1:1 hi": 3,
        f"yes | head -c 300000 | {cli} call {url} | head -c 10": 0,  # reader leaves early
    }
    for cmd, code in cases.items():
        proc = _sh(cmd)
        assert proc.returncode == code, (cmd, proc.returncode, proc.stderr)
        err = no_traceback(proc)
        assert err.count("\n") <= 1, (cmd, err)


def test_call_reset_mid_reply_and_sigint() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(10)

    def reset_after_some() -> None:
        conn, _ = srv.accept()
        conn.recv(100)
        conn.sendall(b"partial")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    t = threading.Thread(target=reset_after_some, daemon=True)
    t.start()
    url = f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    proc = run_cli("call", "--framing", "line", url, "hi")
    t.join(5)
    assert proc.returncode == 5
    assert "reset" in no_traceback(proc)
    # SIGINT while waiting for a reply: 130, no traceback.
    p = subprocess.Popen([*SOCKSERVE, "call", url, "hi"], stderr=subprocess.PIPE)
    conn, _ = srv.accept()
    conn.recv(100)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    conn.close()
    srv.close()
    assert p.returncode == 130
    assert b"Traceback" not in err


# -- item 21: empty stdin lines ---------------------------------------------------------


def test_empty_line_skipped_with_raw_sent_with_line(serve: Serve) -> None:
    st = serve("echo", "tcp://127.0.0.1:0")
    t0 = time.monotonic()
    proc = run_cli("call", st.url("tcp"), input=b"a\n\nc\n")
    assert time.monotonic() - t0 < 4
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"a\nc\n"
    st2 = serve("echo", "tcp://127.0.0.1:0", framing="line")
    proc = run_cli("call", "--framing", "line", st2.url("tcp"), input=b"a\n\nc\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"a\n\nc\n"


# -- item 22: concurrent request() on one aconnect() client ----------------------------


@pytest.mark.parametrize("framing", ["line", "length", "raw"])
def test_concurrent_async_requests_each_get_their_reply(serve: Serve, framing: str) -> None:
    st = serve("echo", "tcp://127.0.0.1:0", framing=framing)

    async def go() -> list[bytes]:
        async with sockserve.aconnect(st.url("tcp"), framing=framing, timeout=10) as c:
            return await asyncio.gather(*(c.request(b"req%d" % i) for i in range(20)))

    replies = asyncio.run(asyncio.wait_for(go(), 30))
    assert replies == [b"req%d" % i for i in range(20)]


# -- item 23: a datagram too large to send -------------------------------------------------


def test_udp_request_too_large_is_a_usage_error(serve: Serve) -> None:
    st = serve("echo", "udp://127.0.0.1:0")
    proc = run_cli("call", st.url("udp"), "x" * 70000)
    assert proc.returncode == 2
    assert "65507" in no_traceback(proc)
    with sockserve.connect(st.url("udp"), timeout=2) as c, pytest.raises(sockserve.RequestTooLarge):
        c.request(b"x" * 70000)


# -- item 26: chat on a terminal and in a pipe ----------------------------------------------


def _read_until(fd: int, want: bytes, timeout: float = 10) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while want not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {want!r} in {buf!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_chat_on_a_tty_has_history_and_ctrl_c_exits_130(serve: Serve) -> None:
    st = serve("echo", "tcp://127.0.0.1:0")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execvpe(SOCKSERVE[0], [*SOCKSERVE, "chat", st.url("tcp")], ENV)
    try:
        _read_until(fd, b"> ")
        os.write(fd, b"hello\r")
        _read_until(fd, b"hello\r\n> ")
        os.write(fd, b"\x1b[A\r")  # up arrow: readline recalls "hello"
        out = _read_until(fd, b"> ")
        out += _read_until(fd, b"> ") if out.count(b"hello") < 2 else b""
        assert out.count(b"hello") >= 2 and b"[A" not in out, out
        os.write(fd, b"\x03")  # Ctrl-C
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "chat did not exit on Ctrl-C"
            # Drain what it prints meanwhile, waiting (not spinning: on a loaded machine a
            # busy wait here starves the child it waits for).
            if select.select([fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    os.read(fd, 4096)
        assert os.waitstatus_to_exitcode(status) == 130
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_chat_writes_no_prompt_into_a_pipe(serve: Serve) -> None:
    st = serve("echo", "tcp://127.0.0.1:0")
    proc = run_cli("chat", st.url("tcp"), input=b"one\ntwo\n")
    assert proc.returncode == 0
    assert proc.stdout == b"one\ntwo\n"


# -- item 27: bench Ctrl-C and the open loop ---------------------------------------------


class CountingEcho:
    """A plain echo server thread that counts requests, for readiness waits."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.count = 0
        self.stop = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(1)
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                self.count += 1
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("procs", ["1", "2"])
def test_bench_ctrl_c_prints_what_was_measured(procs: str) -> None:
    srv = CountingEcho()
    try:
        p = subprocess.Popen(
            [*SOCKSERVE, "bench", srv.url, "-d", "30", "-c", "2", "--procs", procs, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for(lambda: srv.count > 200, 15, "bench traffic")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=15)
    finally:
        srv.close()
    assert p.returncode == 130, err
    assert b"Traceback" not in err
    data = json.loads(out)
    assert data["interrupted"] is True
    assert data["requests"] > 0


def test_bench_open_loop_sleeps_between_sends(serve: Serve) -> None:
    st = serve("echo", "tcp://127.0.0.1:0")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run_cli("bench", st.url("tcp"), "--rate", "1000", "-d", "3", "-c", "2", "-q", "--json")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert json.loads(proc.stdout)["requests"] > 1500
    # Spinning costs the whole 3 s; sleeping between sends about a tenth of it.
    assert cpu < 1.5, f"bench --rate 1000 -d 3 used {cpu:.2f} s of CPU"


# -- item 29: help -----------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["call", "chat", "bench"])
def test_help_ends_with_examples_and_exit_codes(cmd: str) -> None:
    proc = run_cli(cmd, "--help")
    assert proc.returncode == 0
    text = proc.stdout.decode()
    assert "examples:" in text and "exit codes:" in text
    assert text.rstrip().endswith(
        "130  interrupted" + text.rstrip().rsplit("130  interrupted", 1)[1]
    )
    assert f"sockserve {cmd} tcp://" in text
    if cmd == "call":
        assert "[TEXT ...]" in text


# -- item 30: --hex and --json -----------------------------------------------------------


def test_call_hex_dumps_binary_replies(serve: Serve) -> None:
    st = serve("time", "udp://127.0.0.1:0")
    proc = run_cli("call", "--hex", st.url("udp"), "x")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.decode()
    assert line.startswith("00000000: ") and line.count("\n") == 1
    hexpart = line[10:49].replace(" ", "")
    secs = int(hexpart, 16) - 2208988800  # RFC 868: seconds since 1900
    assert abs(secs - time.time()) < 60


def test_call_json_one_object_per_reply(serve: Serve) -> None:
    st = serve("echo", "udp://127.0.0.1:0")
    proc = run_cli("call", "--json", st.url("udp"), input=b"one\n\xff\n")
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(x) for x in proc.stdout.splitlines())
    assert first["request"] == "one" and first["reply"] == "one"
    assert first["latency_ms"] >= 0
    assert second["reply_base64"] == "/w==" and "reply" not in second
