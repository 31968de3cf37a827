"""The CLI end to end: serve, call, chat, services, every error path and its exit code."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from strict import needs, tool
from support import ServerProcess, check_stamp, run_cli

from sockserve.server import ServerThread

needs_ncat = needs(tool("ncat"), "ncat not installed (Debian package ncat)")


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    return err


# -- a server written the textbook way, for `sockserve call` to talk to -----------------


@pytest.fixture
def textbook_server() -> Iterator[tuple[str, int]]:
    """The textbook TCP timestamp server (one client at a time), in a thread."""
    from time import ctime

    tcpSerSock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcpSerSock.bind(("127.0.0.1", 0))
    tcpSerSock.listen(5)
    tcpSerSock.settimeout(10)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                tcpCliSock, _ = tcpSerSock.accept()
            except OSError:
                return
            tcpCliSock.settimeout(10)
            while True:
                try:
                    data = tcpCliSock.recv(1024)
                except OSError:
                    break
                if not data:
                    break
                tcpCliSock.send(b"[%s] %s" % (ctime().encode(), data))
            tcpCliSock.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield tcpSerSock.getsockname()
    stop.set()
    tcpSerSock.close()
    t.join(5)


def test_call_against_textbook_server(textbook_server: tuple[str, int]) -> None:
    host, port = textbook_server
    proc = run_cli("call", f"tcp://{host}:{port}", "hello", "textbook")
    assert proc.returncode == 0, proc.stderr
    check_stamp(proc.stdout.rstrip(b"\n"), b"hello textbook")
    # Several requests over one connection, one per stdin line.
    proc = run_cli("call", f"tcp://{host}:{port}", input=b"one\ntwo\nthree\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for line, req in zip(lines, (b"one", b"two", b"three"), strict=True):
        check_stamp(line, req)


# -- sockserve serve as a real process --------------------------------------------------


def test_serve_defaults_and_call_every_transport(sock_dir: Path) -> None:
    unix = sock_dir / "s.sock"
    gram = sock_dir / "g.sock"
    with ServerProcess(
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        f"unix://{unix}",
        "--listen",
        f"unixgram://{gram}",
        ready=4,
    ) as srv:
        assert any("(timestamp, raw)" in line for line in srv.lines)
        for url in srv.endpoints:
            proc = run_cli("call", url, "hi", "there")
            assert proc.returncode == 0, (url, proc.stderr)
            check_stamp(proc.stdout.rstrip(b"\n"), b"hi there")
        srv.signal(signal.SIGTERM)
        code, log = srv.wait()
        assert code == 0, log
    assert not unix.exists() and not gram.exists()


def test_serve_default_endpoints_log_line(netns: str) -> None:
    """With no arguments: timestamp on TCP and UDP 127.0.0.1:21567. It runs in a private
    network namespace, where that fixed port is always free whatever this host runs."""
    with ServerProcess(ready=2) as srv:
        assert srv.endpoints == ["tcp://127.0.0.1:21567", "udp://127.0.0.1:21567"]
        proc = run_cli("call", "udp://127.0.0.1:21567", "default")
        check_stamp(proc.stdout.rstrip(b"\n"), b"default")
        srv.signal(signal.SIGINT)
        assert srv.wait()[0] == 0


def test_serve_user_module(tmp_path: Path, sock_dir: Path) -> None:
    (tmp_path / "upper_svc.py").write_text("def upper(request, ctx):\n    return request.upper()\n")
    import os

    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with ServerProcess(
        "upper_svc:upper", "--listen", "tcp://127.0.0.1:0", "--framing", "line", env=env
    ) as srv:
        proc = run_cli("call", srv.url("tcp"), "--framing", "line", input=b"abc\ndef\n")
        assert proc.stdout == b"ABC\nDEF\n"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["nosuchservice"], "unknown service"),
        (["nosuchmodule_xyz:fn"], "cannot import module"),
        (["os:nosuchattr"], "has no attribute"),
        (["--listen", "bogus"], "missing scheme"),
        (["--listen", "tcp://127.0.0.1:99999"], "out of range"),
        (["--framing", "xml"], "invalid choice"),
        (["--allow", "not-a-net"], "bad network"),
        (["--max-message", "lots"], "bad size"),
    ],
)
def test_serve_usage_errors(args: list[str], fragment: str) -> None:
    proc = run_cli("serve", *args)
    assert proc.returncode == 2
    assert fragment in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_serve_bind_error_is_one_line(serve: Callable[..., ServerThread]) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0")
    proc = run_cli("serve", "--listen", st.endpoints[0].url())
    assert proc.returncode == 1  # a runtime failure, not a usage error
    assert "address already in use" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


# -- call: exit codes -------------------------------------------------------------------


def test_call_exit_2_bad_url() -> None:
    proc = run_cli("call", "localhost:21567", "x")
    assert proc.returncode == 2
    assert "missing scheme" in one_line_error(proc)


def test_call_exit_2_bad_option() -> None:
    proc = run_cli("call", "tcp://127.0.0.1:1", "--framing", "nope")
    assert proc.returncode == 2


def test_call_exit_3_refused() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # bound then closed: nothing listens there
    proc = run_cli("call", f"tcp://127.0.0.1:{port}", "x")
    assert proc.returncode == 3
    err = one_line_error(proc)
    assert f"tcp://127.0.0.1:{port}" in err and "refused" in err


def test_call_exit_3_no_socket_file(sock_dir: Path) -> None:
    proc = run_cli("call", f"unix://{sock_dir}/absent.sock", "x")
    assert proc.returncode == 3
    assert "no such socket file" in one_line_error(proc)


def test_call_exit_3_udp_refused() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = run_cli("call", f"udp://127.0.0.1:{port}", "--timeout", "3", "x")
    assert proc.returncode == 3, proc.stderr
    one_line_error(proc)


def test_call_exit_4_timeout() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)  # accepts in the kernel, never answers
    try:
        proc = run_cli(
            "call", f"tcp://127.0.0.1:{silent.getsockname()[1]}", "--timeout", "0.5", "x"
        )
        assert proc.returncode == 4
        assert "no reply within 0.5s" in one_line_error(proc)
    finally:
        silent.close()


def test_call_exit_4_udp_timeout() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        proc = run_cli(
            "call", f"udp://127.0.0.1:{silent.getsockname()[1]}", "--timeout", "1.2", "x"
        )
        assert proc.returncode == 4
        # Retransmitted: the silent server saw the request more than once.
        silent.settimeout(1)
        got = [silent.recv(100), silent.recv(100)]
        assert got == [b"x", b"x"]
    finally:
        silent.close()


def test_call_exit_5_closed_early() -> None:
    closer = socket.socket()
    closer.bind(("127.0.0.1", 0))
    closer.listen(5)
    closer.settimeout(10)

    def accept_and_close() -> None:
        conn, _ = closer.accept()
        conn.settimeout(5)
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=accept_and_close)
    t.start()
    try:
        proc = run_cli("call", f"tcp://127.0.0.1:{closer.getsockname()[1]}", "x")
        assert proc.returncode == 5
        assert "closed the connection" in one_line_error(proc)
    finally:
        t.join(10)
        closer.close()


def test_call_udp_retries_a_lost_request() -> None:
    """A server that drops the first datagram: the client resends and gets the reply."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(10)

    def drop_first() -> None:
        srv.recvfrom(100)  # lost
        data, addr = srv.recvfrom(100)
        srv.sendto(b"got " + data, addr)

    t = threading.Thread(target=drop_first)
    t.start()
    try:
        proc = run_cli("call", f"udp://127.0.0.1:{srv.getsockname()[1]}", "again")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == b"got again\n"
    finally:
        t.join(10)
        srv.close()


# -- chat and services ------------------------------------------------------------------


def test_chat(serve: Callable[..., ServerThread]) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0")
    proc = run_cli("chat", st.endpoints[0].url(), input=b"first\nsecond\n\nignored\n")
    assert proc.returncode == 0
    out = proc.stdout.splitlines()  # a pipe gets the replies only, no "> " prompt (issue 10)
    assert len(out) == 2
    check_stamp(out[0], b"first")
    check_stamp(out[1], b"second")
    assert b"ignored" not in proc.stdout


def test_chat_eof_quits(serve: Callable[..., ServerThread]) -> None:
    st = serve("timestamp", "udp://127.0.0.1:0")
    proc = run_cli("chat", st.endpoints[0].url(), input=b"only\n")
    assert proc.returncode == 0
    assert proc.stdout.count(b"\n") == 1 and b"> " not in proc.stdout


def test_chat_connect_error() -> None:
    proc = run_cli("chat", "unix:///nonexistent/dir/sock")
    assert proc.returncode == 3
    one_line_error(proc)


def test_services_lists_timestamp() -> None:
    proc = run_cli("services")
    assert proc.returncode == 0
    assert b"timestamp" in proc.stdout and b"21567" in proc.stdout


def test_no_command_prints_help() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert b"serve" in proc.stdout


# -- netcat-style peers -----------------------------------------------------------------


@needs_ncat
@pytest.mark.parametrize("framing", ["raw", "line"])
def test_ncat_sends_a_line_then_closes(serve: Callable[..., ServerThread], framing: str) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", framing=framing)
    host, port = st.endpoints[0].address()  # type: ignore[misc]
    proc = subprocess.run(
        ["ncat", "-w", "5", host, str(port)],
        input=b"hello from ncat\n",
        capture_output=True,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    expected = b"hello from ncat\n" if framing == "raw" else b"hello from ncat"
    check_stamp(proc.stdout.rstrip(b"\n") if framing == "line" else proc.stdout, expected)


@needs_ncat
def test_ncat_udp_and_unix(serve: Callable[..., ServerThread], sock_dir: Path) -> None:
    path = sock_dir / "nc.sock"
    st = serve("timestamp", "udp://127.0.0.1:0", f"unix://{path}")
    host, port = st.endpoints[0].address()  # type: ignore[misc]
    # ncat quits at stdin EOF over UDP, so keep its stdin open until the reply is read.
    nc = subprocess.Popen(
        ["ncat", "-u", host, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert nc.stdin is not None and nc.stdout is not None
        nc.stdin.write(b"udp line\n")
        nc.stdin.flush()
        import select

        assert select.select([nc.stdout], [], [], 10)[0], "no UDP reply through ncat"
        check_stamp(os.read(nc.stdout.fileno(), 4096), b"udp line\n")
    finally:
        nc.kill()
        nc.wait(5)
    unix = subprocess.run(
        ["ncat", "-U", "-w", "5", str(path)], input=b"unix line\n", capture_output=True, timeout=20
    )
    assert unix.returncode == 0, unix.stderr
    check_stamp(unix.stdout, b"unix line\n")


@pytest.mark.parametrize(
    "args", [["--engine", "asyncio"], ["--busy-poll", "0"], ["--busy-poll", "500"]]
)
def test_serve_engine_options(args: list[str]) -> None:
    with ServerProcess(
        "--listen", "tcp://127.0.0.1:0", "--listen", "udp://127.0.0.1:0", *args, ready=2
    ) as srv:
        for url in srv.endpoints:
            proc = run_cli("call", url, "engine")
            assert proc.returncode == 0, proc.stderr
            check_stamp(proc.stdout.rstrip(b"\n"), b"engine")
        srv.signal(signal.SIGTERM)
        assert srv.wait()[0] == 0


def test_serve_rejects_bad_engine_options() -> None:
    assert run_cli("serve", "--engine", "threads").returncode == 2
    proc = run_cli("serve", "--busy-poll", "99999")
    assert proc.returncode == 2
    assert "busy poll" in proc.stderr.decode()
