"""Interop: the classic services next to a real inetd's built-ins (Debian ``openbsd-inetd``).

inetd runs from the test in the foreground (``inetd -d CONFIG``) with a config of
our own in a temp dir. Its internal services only work on their standard ports
(7, 9, 13, 19, 37), so this needs root. openbsd-inetd has no qotd built-in, so qotd
is not compared. sockserve runs the same services on port-0 endpoints.

The whole module runs in a private network namespace (tests/netns.py): there the
standard ports are always free, and there is a non-loopback address, 192.0.2.1,
that exists only in the namespace. UDP needs it: openbsd-inetd drops datagrams
whose source is a loopback address (its guard against two services answering
each other in a loop), so the UDP tests bind both servers and the client to it.
Nothing is sent to this host's own interface addresses.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from classic_helpers import (
    ALL_BYTES_MIB,
    DAYTIME,
    RFC868_OFFSET,
    TIMEOUT,
    chargen_reference,
    read_exactly,
    read_until_eof,
    stream_through,
)
from netns import NETNS_ADDR, private_netns
from strict import IS_ROOT, needs, tool

from sockserve._engine.datagram import DatagramRuntime
from sockserve._engine.runtime import StreamRuntime
from sockserve.server import Server, ServerConfig, ServerThread, make_binding

INETD = tool("inetd", "/usr/sbin/inetd")
TCP_PORTS = {"echo": 7, "discard": 9, "daytime": 13, "chargen": 19, "time": 37}
UDP_PORTS = {"echo": 7, "daytime": 13, "chargen": 19, "time": 37}
REMOTE = NETNS_ADDR
Addr = tuple[str, int]

pytestmark = [
    needs(INETD is not None, "inetd not installed (Debian package openbsd-inetd)"),
    needs(IS_ROOT, "inetd's built-ins need the privileged ports 7-37 (root)"),
]


def _wait_listening(addrs: list[Addr], proc: subprocess.Popen[bytes], log: Path) -> None:
    """Readiness: every TCP port accepts a connection (bounded; fails with inetd's log)."""
    deadline = time.monotonic() + 10
    for addr in addrs:
        while True:
            try:
                socket.create_connection(addr, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"inetd never listened on {addr}:\n{log.read_text(errors='replace')}"
                    ) from None
                time.sleep(0.01)  # poll interval of a readiness wait


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    """The module's private network namespace (entered before inetd and ours start)."""
    with private_netns() as addr:
        yield addr


@pytest.fixture(scope="module")
def inetd(namespace: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Addr]]:
    """inetd's TCP built-ins on 127.0.0.1 and its UDP ones on REMOTE, in the namespace."""
    assert INETD is not None
    d = tmp_path_factory.mktemp("inetd")
    conf = d / "inetd.conf"
    lines = [f"127.0.0.1:{name} stream tcp nowait root internal" for name in TCP_PORTS]
    lines += [f"{REMOTE}:{name} dgram udp wait root internal" for name in UDP_PORTS]
    conf.write_text("\n".join(lines) + "\n")
    log = d / "inetd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([INETD, "-d", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        addrs = {name: ("127.0.0.1", port) for name, port in TCP_PORTS.items()}
        _wait_listening(list(addrs.values()), proc, log)
        addrs.update({f"udp-{n}": (REMOTE, p) for n, p in UDP_PORTS.items()})
        yield addrs
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def ours(namespace: str) -> Iterator[dict[str, Addr]]:
    """The same services from sockserve, one server, port 0 each (UDP on REMOTE with
    --udp-amplify, since that source is non-loopback and inetd has no such guard)."""
    bindings = [make_binding(name, ["tcp://127.0.0.1:0"]) for name in TCP_PORTS]
    amplify = ServerConfig(udp_amplify=True)
    bindings += [make_binding(n, [f"udp://{REMOTE}:0"], amplify) for n in UDP_PORTS]
    with ServerThread(Server(*bindings)) as st:
        addrs: dict[str, Addr] = {}
        runtimes: list[StreamRuntime | DatagramRuntime] = [*st.server.streams, *st.server.datagrams]
        for rt in runtimes:
            ep = rt.endpoint  # as bound: the real port
            key = rt.service.name if ep.is_stream else f"udp-{rt.service.name}"
            addrs[key] = (ep.host, ep.port)
        yield addrs


def tcp(addr: Addr) -> socket.socket:
    return socket.create_connection(addr, timeout=TIMEOUT)


def both(inetd: dict[str, Addr], ours: dict[str, Addr], key: str) -> list[Addr]:
    return [inetd[key], ours[key]]


# -- TCP -----------------------------------------------------------------------------------


def test_echo_returns_a_mebibyte_of_every_byte_like_inetd(
    inetd: dict[str, Addr], ours: dict[str, Addr]
) -> None:
    replies = []
    for addr in both(inetd, ours, "echo"):
        with tcp(addr) as s:
            replies.append(stream_through(s, ALL_BYTES_MIB))
    assert replies[0] == replies[1] == ALL_BYTES_MIB


def test_echo_half_close_like_inetd(inetd: dict[str, Addr], ours: dict[str, Addr]) -> None:
    replies = []
    for addr in both(inetd, ours, "echo"):
        with tcp(addr) as s:
            s.sendall(b"bye\r\n\x00")
            s.shutdown(socket.SHUT_WR)
            replies.append(read_until_eof(s))
    assert replies[0] == replies[1] == b"bye\r\n\x00"


def test_chargen_stream_is_byte_for_byte_inetds(
    inetd: dict[str, Addr], ours: dict[str, Addr]
) -> None:
    n = 1 << 20
    streams = []
    for addr in both(inetd, ours, "chargen"):
        with tcp(addr) as s:
            streams.append(read_exactly(s, n))
    assert streams[0] == streams[1]
    assert streams[1] == chargen_reference(n)


def test_chargen_keeps_going_after_a_half_close_like_inetd(
    inetd: dict[str, Addr], ours: dict[str, Addr]
) -> None:
    streams = []
    for addr in both(inetd, ours, "chargen"):
        with tcp(addr) as s:
            s.shutdown(socket.SHUT_WR)
            streams.append(read_exactly(s, 256 * 1024))
    assert streams[0] == streams[1]


def test_discard_reads_everything_and_says_nothing_like_inetd(
    inetd: dict[str, Addr], ours: dict[str, Addr]
) -> None:
    for addr in both(inetd, ours, "discard"):
        with tcp(addr) as s:
            s.sendall(ALL_BYTES_MIB)
            s.shutdown(socket.SHUT_WR)
            assert read_until_eof(s) == b"", addr


def test_time_agrees_with_inetd_and_the_clock(
    inetd: dict[str, Addr], ours: dict[str, Addr]
) -> None:
    values = []
    for addr in both(inetd, ours, "time"):
        with tcp(addr) as s:
            reply = read_until_eof(s)  # 4 bytes, then the server closes
        assert len(reply) == 4, (addr, reply)
        values.append(struct.unpack("!I", reply)[0])
    now = (int(time.time()) + RFC868_OFFSET) % 2**32
    assert abs(values[0] - values[1]) <= 2
    assert abs(values[1] - now) <= 2


def _daytime_seconds(line: bytes) -> float:
    assert DAYTIME.fullmatch(line), line
    return time.mktime(time.strptime(line.decode().strip(), "%a %b %d %H:%M:%S %Y"))


def test_daytime_has_inetds_format(inetd: dict[str, Addr], ours: dict[str, Addr]) -> None:
    lines = []
    for addr in both(inetd, ours, "daytime"):
        with tcp(addr) as s:
            lines.append(read_until_eof(s))
    assert len(lines[0]) == len(lines[1]) == 26  # ctime's 24 characters + CRLF
    assert abs(_daytime_seconds(lines[0]) - _daytime_seconds(lines[1])) <= 2


# -- UDP (from the namespace's non-loopback address; see the module docstring) -------------


def _udp(addr: Addr, payload: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.bind((REMOTE, 0))
        s.sendto(payload, addr)
        return s.recv(65536)


def test_udp_echo_time_daytime_like_inetd(inetd: dict[str, Addr], ours: dict[str, Addr]) -> None:
    echo = [_udp(a, bytes(range(256))) for a in both(inetd, ours, "udp-echo")]
    assert echo[0] == echo[1] == bytes(range(256))
    stamps = [struct.unpack("!I", _udp(a, b""))[0] for a in both(inetd, ours, "udp-time")]
    assert abs(stamps[0] - stamps[1]) <= 2
    days = [_udp(a, b"") for a in both(inetd, ours, "udp-daytime")]
    assert abs(_daytime_seconds(days[0]) - _daytime_seconds(days[1])) <= 2


def test_udp_chargen_replies_are_pieces_of_the_same_pattern(
    inetd: dict[str, Addr], ours: dict[str, Addr]
) -> None:
    """inetd sends one 74-byte line; RFC 864 (and we) send 0-512 random characters.
    Both start on a line of the same pattern, so compare the overlap."""
    pattern = chargen_reference(95 * 74 + 600)
    starts = [pattern[i * 74 : i * 74 + 600] for i in range(95)]
    theirs_addr, ours_addr = both(inetd, ours, "udp-chargen")
    theirs = _udp(theirs_addr, b"x")
    assert len(theirs) == 74 and any(s.startswith(theirs) for s in starts)
    for _ in range(10):
        mine = _udp(ours_addr, b"x")
        assert len(mine) <= 512 and any(s.startswith(mine) for s in starts)
