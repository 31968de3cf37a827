"""Issue 10, items 10-12 and the review after them: access control behind a PROXY header,
IPv4 clients on a dual-stack socket, --unix-mode on abstract sockets, stale Unix socket files.

Every server here is real and on loopback or a Unix path; clients bind 127.0.0.x sources.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import whoami
from faultkit import LogTap, closed_by_peer
from support import run_cli

import sockserve
from sockserve.config import parse_network
from sockserve.errors import ConfigError, EndpointError, RemoteProtocolError
from sockserve.framing.proxy import V2_SIGNATURE, encode_v1, encode_v2, parse_header
from sockserve.server import Server, ServerConfig, ServerThread, make_binding
from sockserve.server.listeners import adopt_socket

pytestmark = pytest.mark.timeout(60)

Serve = Callable[..., ServerThread]


def nets(*cidrs: str) -> tuple[Any, ...]:
    return tuple(parse_network(c) for c in cidrs)


def v2_unix(path: bytes = b"/run/client.sock", dgram: bool = False) -> bytes:
    block = path.ljust(108, b"\0") + b"/run/proxy.sock".ljust(108, b"\0")
    return V2_SIGNATURE + bytes([0x21, 0x32 if dgram else 0x31]) + (216).to_bytes(2, "big") + block


V2_UNSPEC = V2_SIGNATURE + b"\x21\x00\x00\x00"
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"

#: Headers that relay a client without naming its IP address.
NO_IP = {
    "v2-unix": v2_unix(),
    "v2-unix-dgram": v2_unix(dgram=True),
    "v2-unspec": V2_UNSPEC,
    "v1-unknown": V1_UNKNOWN,
}


def exchange(addr: Any, data: bytes, source: str = "127.0.0.1", timeout: float = 5) -> bytes:
    """Send ``data`` (after connecting from ``source``) and read the reply; b'' if closed."""
    if isinstance(addr, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(addr)
    else:
        s = socket.create_connection(addr, timeout=timeout, source_address=(source, 0))
    with s:
        try:
            s.sendall(data)
            return s.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return b""


# -- item 10: a PROXY header that names no IP address cannot walk past the rules ----------


@pytest.mark.parametrize("name", sorted(NO_IP))
def test_header_without_ip_refused_under_allow(
    serve: Serve, server_logs: LogTap, name: str
) -> None:
    srv = serve(
        whoami,
        "tcp://127.0.0.1:0",
        proxy_protocol=True,
        proxy_from=nets("127.0.0.1/32"),
        allow=nets("10.0.0.0/8"),
    )
    addr = srv.endpoints[0].address()
    # The control case: an IPv4 client outside --allow is refused ...
    assert exchange(addr, encode_v1(("192.0.2.9", 1), ("127.0.0.1", 2)) + b"x") == b""
    # ... and so is a client the header does not name by IP (a v2 Unix address was served).
    assert exchange(addr, NO_IP[name] + b"x") == b""
    server_logs.wait_for("names no IP address")
    # An allowed client still gets in.
    assert exchange(addr, encode_v1(("10.1.2.3", 1), ("127.0.0.1", 2)) + b"x").startswith(
        b"10.1.2.3 1 "
    )


@pytest.mark.parametrize("name", sorted(NO_IP))
def test_header_without_ip_refused_under_deny_too(serve: Serve, name: str) -> None:
    """Fail closed: a deny list cannot be dodged by claiming a family it cannot name."""
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, deny=nets("192.0.2.0/24"))
    addr = srv.endpoints[0].address()
    assert exchange(addr, NO_IP[name] + b"x") == b""
    assert exchange(addr, encode_v2(("198.51.100.7", 1), ("127.0.0.1", 2)) + b"x").startswith(
        b"198.51.100.7 1 "
    )


def test_header_without_ip_served_when_there_are_no_rules(serve: Serve) -> None:
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, proxy_from=nets("127.0.0.1/32"))
    addr = srv.endpoints[0].address()
    assert exchange(addr, v2_unix() + b"x").startswith(b"/run/client.sock 0 ")
    assert exchange(addr, V2_UNSPEC + b"x").startswith(b"127.0.0.1 ")  # the real connection


def test_unix_listener_behind_proxy_applies_the_rules(serve: Serve, sock_dir: Path) -> None:
    """On a unix:// listener the real peer has no address either: that was a second way in."""
    path = str(sock_dir / "p.sock")
    serve(whoami, f"unix://{path}", proxy_protocol=True, allow=nets("10.0.0.0/8"))
    for data in NO_IP.values():
        assert exchange(path, data + b"x") == b""
    assert exchange(path, encode_v1(("10.9.9.9", 5), ("10.0.0.1", 6)) + b"x").startswith(
        b"10.9.9.9 5 "
    )
    # LOCAL: the proxy's own connection, let in by the socket file's mode as without a header.
    assert exchange(path, V2_LOCAL + b"x").startswith(b" 0 " + path.encode())


def test_local_health_check_is_judged_as_the_proxys_own_connection(serve: Serve) -> None:
    allow = nets("10.0.0.0/8")
    # Behind --proxy-from the proxy is trusted for its own connections (HAProxy's
    # check-send-proxy with send-proxy-v2 sends LOCAL): the health check passes.
    trusted = serve(
        whoami, "tcp://127.0.0.1:0", proxy_protocol=True, proxy_from=nets("127.0.0.3"), allow=allow
    )
    reply = exchange(trusted.endpoints[0].address(), V2_LOCAL + b"x", source="127.0.0.3")
    assert reply.startswith(b"127.0.0.3 ")
    # Without --proxy-from anyone may send LOCAL: the rules judge the real address.
    open_ = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, allow=allow)
    assert exchange(open_.endpoints[0].address(), V2_LOCAL + b"x", source="127.0.0.3") == b""
    local = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, allow=nets("127.0.0.3"))
    reply = exchange(local.endpoints[0].address(), V2_LOCAL + b"x", source="127.0.0.3")
    assert reply.startswith(b"127.0.0.3 ")


def test_warnings_at_start_name_what_proxy_protocol_leaves_open(
    serve: Serve, server_logs: LogTap, sock_dir: Path
) -> None:
    serve(whoami, "tcp://127.0.0.1:0", "udp://127.0.0.1:0", proxy_protocol=True)
    server_logs.wait_for("without --proxy-from: any client that can connect can claim any address")
    server_logs.wait_for("applies to stream endpoints only")
    path = sock_dir / "w.sock"
    serve(whoami, f"unix://{path}", proxy_protocol=True, proxy_from=nets("127.0.0.1"))
    server_logs.wait_for("--proxy-from cannot apply to a Unix socket")
    warned = server_logs.count("without --proxy-from")
    serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, proxy_from=nets("127.0.0.1"))
    serve(whoami, "tcp://127.0.0.1:0")  # no PROXY protocol: nothing to warn about
    assert server_logs.count("without --proxy-from") == warned


def test_cli_warns_without_proxy_from() -> None:
    from support import ServerProcess

    with ServerProcess("timestamp", "--listen", "tcp://127.0.0.1:0", "--proxy-protocol") as srv:
        srv.wait_line("WARNING")
        assert "--proxy-from" in srv.log


# -- item 10: IPv4 clients on a dual-stack socket -----------------------------------------


def dual_stack(service: Any, socktype: int, config: ServerConfig) -> ServerThread:
    """A server on one AF_INET6 socket with IPV6_V6ONLY off, bound to ::ffff:127.0.0.1:
    IPv4 clients reach it and are named ``::ffff:127.0.0.x``, as on a dual-stack [::]."""
    sock = socket.socket(socket.AF_INET6, socktype)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::ffff:127.0.0.1", 0))
    if socktype == socket.SOCK_STREAM:
        sock.listen(16)
    lst = adopt_socket(sock)
    binding = make_binding(service, [lst.endpoint], config)
    binding.listeners[lst.endpoint] = lst
    st = ServerThread(Server(binding))
    st.start()
    return st


def tcp_served(port: int, source: str) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        try:
            s.sendall(b"hello")
            return s.recv(4096).endswith(b"hello")
        except (ConnectionResetError, BrokenPipeError):
            return False


def udp_served(port: int, source: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(0.5)
        s.sendto(b"hello", ("127.0.0.1", port))
        try:
            return s.recv(4096).endswith(b"hello")
        except TimeoutError:
            return False


@pytest.mark.parametrize("kind", ["tcp", "udp"])
@pytest.mark.parametrize("rule", ["127.0.0.2/32", "::ffff:127.0.0.2/128"])
def test_dual_stack_ipv4_client_cannot_walk_past_deny(kind: str, rule: str) -> None:
    socktype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    served = tcp_served if kind == "tcp" else udp_served
    st = dual_stack("timestamp", socktype, ServerConfig(deny=nets(rule)))
    try:
        port = st.endpoints[0].port
        assert port is not None
        assert served(port, "127.0.0.3"), "a client outside the rule must be served"
        assert not served(port, "127.0.0.2"), f"{rule} let ::ffff:127.0.0.2 in"
    finally:
        st.stop()


@pytest.mark.parametrize("rule", ["127.0.0.3/32", "::ffff:127.0.0.3/128"])
def test_dual_stack_allow_matches_either_spelling(rule: str) -> None:
    st = dual_stack("timestamp", socket.SOCK_STREAM, ServerConfig(allow=nets(rule)))
    try:
        port = st.endpoints[0].port
        assert port is not None
        assert tcp_served(port, "127.0.0.3")
        assert not tcp_served(port, "127.0.0.2")
    finally:
        st.stop()


def test_mapped_address_in_a_proxy_header_meets_mapped_deny(serve: Serve) -> None:
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, deny=nets("::ffff:192.0.2.0/120"))
    addr = srv.endpoints[0].address()
    assert exchange(addr, encode_v1(("192.0.2.9", 1), ("127.0.0.1", 2)) + b"x") == b""
    assert exchange(addr, encode_v2(("::ffff:192.0.2.9", 1), ("::1", 2)) + b"x") == b""
    assert exchange(addr, encode_v1(("198.51.100.1", 1), ("127.0.0.1", 2)) + b"x") != b""


# -- item 11: --unix-mode on an abstract socket ----------------------------------------------


def test_unix_mode_on_abstract_socket_is_a_config_error() -> None:
    name = f"unix://@sockserve-test-{os.getpid()}"
    with pytest.raises(ConfigError, match=f"{name}: --unix-mode cannot apply to an abstract"):
        make_binding("timestamp", [name], ServerConfig(unix_mode=0o600))
    assert issubclass(ConfigError, ValueError)
    # A path endpoint beside it is fine; without --unix-mode the abstract one is too.
    make_binding("timestamp", ["unix:///tmp/x.sock"], ServerConfig(unix_mode=0o600))
    make_binding("timestamp", [name], ServerConfig())


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_unix_mode_on_abstract_socket_is_a_usage_error(workers: str) -> None:
    name = f"unix://@sockserve-test-{os.getpid()}"
    r = run_cli("serve", "timestamp", "--listen", name, "--unix-mode", "600", "--workers", workers)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and name in err and "abstract" in err, err
    assert "Traceback" not in err


# -- item 12: the stale-socket check ----------------------------------------------------------


def answers(scheme: str, path: str) -> bool:
    with sockserve.connect(f"{scheme}://{path}", timeout=5) as c:
        return c.request(b"ping").endswith(b"ping")


@pytest.mark.parametrize(("live", "other"), [("unix", "unixgram"), ("unixgram", "unix")])
def test_live_socket_of_the_other_type_is_not_deleted(
    serve: Serve, sock_dir: Path, live: str, other: str
) -> None:
    path = str(sock_dir / "live.sock")
    serve("timestamp", f"{live}://{path}")
    inode = os.stat(path).st_ino
    with pytest.raises(EndpointError, match=f"another server is listening on {path}") as info:
        serve("timestamp", f"{other}://{path}")
    assert ("stream" if live == "unix" else "datagram") in str(info.value)
    assert os.stat(path).st_ino == inode
    assert answers(live, path)


def test_cli_names_the_path_in_use(serve: Serve, sock_dir: Path) -> None:
    path = str(sock_dir / "live.sock")
    serve("timestamp", f"unix://{path}")
    r = run_cli("serve", "timestamp", "--listen", f"unixgram://{path}")
    err = r.stderr.decode()
    assert r.returncode != 0 and path in err and "Traceback" not in err, err
    assert answers("unix", path)


@pytest.mark.parametrize("scheme", ["unix", "unixgram"])
def test_bound_socket_not_yet_serving_is_not_deleted(sock_dir: Path, scheme: str) -> None:
    """A stream socket bound but not listening yet (a server starting up) refuses stream
    connects, but it is alive: a datagram probe tells (EPROTOTYPE)."""
    path = str(sock_dir / "starting.sock")
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        holder.bind(path)
        inode = os.stat(path).st_ino
        with pytest.raises(EndpointError, match="a stream socket is bound to it"):
            make_server(f"{scheme}://{path}")
        assert os.stat(path).st_ino == inode
    finally:
        holder.close()


def make_server(url: str) -> None:
    st = ServerThread(Server(make_binding("timestamp", [url])))
    st.start()
    st.stop()


@pytest.mark.parametrize("stale_type", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
@pytest.mark.parametrize("scheme", ["unix", "unixgram"])
def test_stale_file_of_either_type_is_replaced(
    serve: Serve, sock_dir: Path, stale_type: int, scheme: str
) -> None:
    path = str(sock_dir / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, stale_type)
    leftover.bind(path)
    leftover.close()
    serve("timestamp", f"{scheme}://{path}")
    assert answers(scheme, path)


def test_regular_file_and_symlink_are_never_removed(sock_dir: Path) -> None:
    path = sock_dir / "data.sock"
    path.write_bytes(b"precious")
    for scheme in ("unix", "unixgram"):
        with pytest.raises(EndpointError, match="exists and is not a socket"):
            make_server(f"{scheme}://{path}")
        assert path.read_bytes() == b"precious"
    path.unlink()
    # A symlink, even to a stale socket, is refused (it was unlinked before).
    target = sock_dir / "target.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(target))
    leftover.close()
    path.symlink_to(target)
    with pytest.raises(EndpointError, match="exists and is a symlink"):
        make_server(f"unix://{path}")
    assert path.is_symlink() and target.is_socket()


# -- review: hostile PROXY headers -------------------------------------------------------------


def test_unix_path_from_a_header_cannot_forge_log_lines(serve: Serve, server_logs: LogTap) -> None:
    evil = b"/x\n2026-01-01 00:00:00 INFO sockserve.conn: forged\x1b[2J\xff\\"
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, proxy_from=nets("127.0.0.1"))
    reply = exchange(srv.endpoints[0].address(), v2_unix(evil) + b"x")
    peer = reply.split(b" ")[0]
    assert peer.startswith(b"/x\\x0a2026-01-01") and b"\\x1b[2J\\xff\\x5c" in reply, reply
    server_logs.wait_for("open from /x\\x0a2026")
    assert not any("\n" in m or "\x1b" in m for m in server_logs.messages())


def test_v1_zone_ids_are_not_in_the_grammar() -> None:
    with pytest.raises(RemoteProtocolError, match="bad address"):
        parse_header(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n")
    h, _ = parse_header(b"PROXY TCP6 fe80::1 ::1 1 2\r\n")  # type: ignore[misc]
    assert h.source == ("fe80::1", 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -1.0])
def test_proxy_header_timeout_must_be_positive_and_finite(bad: float) -> None:
    with pytest.raises(ConfigError, match="PROXY header timeout"):
        ServerConfig(proxy_protocol=True, proxy_header_timeout=bad)


def test_cli_nan_header_timeout_is_a_usage_error() -> None:
    r = run_cli(
        "serve", "timestamp", "--listen", "tcp://127.0.0.1:0", "--proxy-protocol",
        "--proxy-header-timeout", "nan",
    )  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 2 and "PROXY header timeout" in err and "Traceback" not in err, err


def test_header_timeout_is_a_deadline_not_per_read(serve: Serve, server_logs: LogTap) -> None:
    """A client trickling a (valid so far) v2 header is cut at the deadline, however it trickles."""
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, proxy_header_timeout=0.5)
    header = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=((0x05, b"z" * 200),))
    with socket.create_connection(srv.endpoints[0].address(), timeout=5) as s:  # type: ignore[arg-type]
        started = time.monotonic()
        closed = False
        for i in range(len(header) - 1):  # never the last byte
            try:
                s.sendall(header[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if time.monotonic() - started > 3:
                break
            time.sleep(0.05)
        assert closed or closed_by_peer(s, 3)
        assert time.monotonic() - started < 3
    server_logs.wait_for("PROXY header: none within 0.5s")


def test_largest_v2_header_is_read_and_garbage_after_it_goes_to_the_service(
    serve: Serve,
) -> None:
    """A 64 KiB TLV (the spec's upper bound) is read whole; bytes after the header, even
    non-text ones, are the service's, not part of the header."""
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True)
    tlv = (0xE0, b"t" * (0xFFFF - 12 - 3))
    header = encode_v2(("192.0.2.3", 3), ("192.0.2.4", 4), tlvs=(tlv,))
    assert len(header) == 16 + 0xFFFF
    with socket.create_connection(srv.endpoints[0].address(), timeout=5) as s:  # type: ignore[arg-type]
        s.sendall(header + b"\xff\x00junk")
        assert s.recv(4096).startswith(b"192.0.2.3 3 192.0.2.4 4 ")
    # A TLV that claims more than the 64 KiB header holds is refused, not waited for.
    overrun = header[:28] + b"\xe0\xff\xff" + header[31:]
    assert exchange(srv.endpoints[0].address(), overrun) == b""


def test_rules_meet_ipv4_clients_however_spelled() -> None:
    from sockserve._engine.guards import AccessControl

    acl = AccessControl(nets("::/0"), nets("2001:db8::/32"))
    assert acl.permits("2001:db9::1") and not acl.permits("2001:db8::1")
    # An IPv4 client is an IPv4 client however spelled: an IPv6 rule does not cover it.
    assert not acl.permits("::ffff:10.0.0.1") and not acl.permits("10.0.0.1")
    mapped = AccessControl((), nets("::ffff:10.0.0.0/104"))
    assert not mapped.permits("10.1.2.3") and not mapped.permits("::ffff:10.1.2.3")
    assert mapped.permits("11.0.0.1")
    assert not acl.permits("not an address")
    assert AccessControl((), ()).permits("/run/client.sock")
