"""Access control on real sockets: --allow/--deny for TCP and UDP, IPv4 and IPv6, and
--unix-mode for Unix socket files. Denied clients get nothing; everyone else is served.

The denied client is bound to 127.0.0.2 (all of 127/8 is loopback on Linux).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from faultkit import LoggedServer, LogTap, addr_of, assert_alive, closed_by_peer
from strict import needs_ipv6
from support import run_cli

import sockserve
from sockserve.server import ServerThread

pytestmark = pytest.mark.timeout(60)

Serve = Callable[..., ServerThread]


def tcp_gets_nothing(url: str, source: str) -> bool:
    """Connect from ``source``, send a request: True if the server closed without a byte."""
    host, port = addr_of(url)
    with socket.create_connection((host, port), timeout=5, source_address=(source, 0)) as s:
        try:
            s.sendall(b"let me in")
        except (ConnectionResetError, BrokenPipeError):
            return True
        s.settimeout(5)
        try:
            data = s.recv(1024)
        except ConnectionResetError:
            return True
        if data:
            return False
        return closed_by_peer(s)


def udp_answered(url: str, source: str, timeout: float = 0.5) -> bool:
    with sockserve.connect(url, timeout=timeout, source=(source, 0)) as c:
        try:
            return c.request(b"hello").endswith(b"hello")
        except sockserve.RequestTimeout:
            return False


def test_deny_tcp_and_udp_ipv4(serve: Serve, server_logs: LogTap) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", "udp://127.0.0.1:0", deny=("127.0.0.2/32",))
    assert tcp_gets_nothing(st.url("tcp"), "127.0.0.2"), "a denied TCP client got a reply"
    server_logs.wait_for("denied 127.0.0.2:")
    assert not udp_answered(st.url("udp"), "127.0.0.2"), "a denied UDP client got a reply"
    assert tcp_gets_nothing(st.url("tcp"), "127.0.0.2"), (
        "a denied TCP client got a reply the second time"
    )
    assert_alive(st.url("tcp"))
    assert_alive(st.url("udp"))


def test_allow_admits_only_the_listed_network(serve: Serve) -> None:
    st = serve("timestamp", "tcp://127.0.0.1:0", "udp://127.0.0.1:0", allow=["127.0.0.1"])
    assert tcp_gets_nothing(st.url("tcp"), "127.0.0.2")
    assert not udp_answered(st.url("udp"), "127.0.0.2")
    assert udp_answered(st.url("udp"), "127.0.0.1", timeout=5)
    assert_alive(st.url("tcp"))


def test_deny_wins_over_allow(serve: Serve) -> None:
    st = serve(
        "timestamp",
        "tcp://127.0.0.1:0",
        "udp://127.0.0.1:0",
        allow=["127.0.0.0/8"],
        deny=["127.0.0.2"],
    )
    assert tcp_gets_nothing(st.url("tcp"), "127.0.0.2")
    assert not udp_answered(st.url("udp"), "127.0.0.2")
    with sockserve.connect(st.url("tcp"), timeout=5, source=("127.0.0.3", 0)) as c:
        assert c.request(b"three").endswith(b"three")
    assert udp_answered(st.url("udp"), "127.0.0.3", timeout=5)


@needs_ipv6
def test_deny_and_allow_ipv6(serve: Serve) -> None:
    denied = serve("timestamp", "tcp://[::1]:0", "udp://[::1]:0", deny=["::1/128"])
    assert tcp_gets_nothing(denied.url("tcp"), "::1")
    assert not udp_answered(denied.url("udp"), "::1")
    # An IPv4 rule does not catch an IPv6 client; an IPv6 allow admits it.
    allowed = serve(
        "timestamp", "tcp://[::1]:0", "udp://[::1]:0", allow=["::1"], deny=["127.0.0.0/8"]
    )
    assert_alive(allowed.url("tcp"))
    assert udp_answered(allowed.url("udp"), "::1", timeout=5)
    # The denied server is still up, and still denying.
    assert tcp_gets_nothing(denied.url("tcp"), "::1")


def test_cli_allow_deny_for_tcp_and_udp() -> None:
    with LoggedServer(
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        "udp://127.0.0.1:0",
        "--deny",
        "127.0.0.2/32",
        ready=2,
    ) as srv:
        assert tcp_gets_nothing(srv.url("tcp"), "127.0.0.2")
        srv.wait_line("denied 127.0.0.2:")
        assert not udp_answered(srv.url("udp"), "127.0.0.2")
        assert_alive(srv.url("tcp"))
        assert_alive(srv.url("udp"))
        done = run_cli("call", srv.url("tcp"), "via", "cli")
        assert done.returncode == 0 and done.stdout.endswith(b"via cli\n"), done


def test_cli_rejects_a_bad_cidr() -> None:
    done = run_cli("serve", "--listen", "tcp://127.0.0.1:0", "--deny", "300.1.2.3/8")
    assert done.returncode == 2
    assert b"bad network '300.1.2.3/8'" in done.stderr


@pytest.mark.parametrize("scheme", ["unix", "unixgram"])
def test_unix_mode_sets_socket_file_permissions(serve: Serve, sock_dir: Path, scheme: str) -> None:
    path = sock_dir / f"mode-{scheme}.sock"
    st = serve("timestamp", f"{scheme}://{path}", unix_mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert_alive(st.url(scheme))


def test_cli_unix_mode(sock_dir: Path) -> None:
    path = sock_dir / "cli-mode.sock"
    with LoggedServer("--listen", f"unix://{path}", "--unix-mode", "660") as srv:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert_alive(srv.url("unix"))
    done = run_cli("serve", "--listen", f"unix://{path}", "--unix-mode", "rw-rw----")
    assert done.returncode == 2 and b"bad Unix socket mode" in done.stderr
