"""PROXY protocol v1/v2: the sans-IO reader byte by byte and fuzzed, then the server behind it."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import pytest
from deploy_helpers import readable, whoami
from hypothesis import given, settings
from hypothesis import strategies as st

from sockserve.config import parse_network
from sockserve.errors import RemoteProtocolError
from sockserve.framing.proxy import (
    V1_MAX,
    V2_SIGNATURE,
    ProxyHeaderReader,
    encode_v1,
    encode_v2,
    parse_header,
)
from sockserve.server import ServerThread

# Examples as the spec (HAProxy's proxy-protocol.txt) writes them.
V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V1_UNKNOWN_LONGEST = (
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)


def feed_bytewise(data: bytes) -> tuple[Any, bytes]:
    r = ProxyHeaderReader()
    header = None
    for i in range(len(data)):
        header = r.feed(data[i : i + 1])
    return header, r.rest


# -- version 1 ---------------------------------------------------------------------------


def test_v1_tcp4_whole_and_bytewise_with_trailing_data() -> None:
    data = V1_TCP4 + b"GET / HTTP/1.0\r\n"
    for header, rest in ((parse_header(data), None), feed_bytewise(data)):
        if rest is None:
            header, used = header  # type: ignore[misc]
            rest = data[used:]
        assert header.version == 1 and header.command == "PROXY" and header.family == "TCP4"
        assert header.source == ("192.168.0.1", 56324)
        assert header.destination == ("192.168.0.11", 443)
        assert rest == b"GET / HTTP/1.0\r\n"


def test_v1_tcp6_and_unknown() -> None:
    h, used = parse_header(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\nx")  # type: ignore[misc]
    assert (h.source, h.destination, used) == (("2001:db8::1", 1), ("::1", 65535), 36)
    assert len(V1_UNKNOWN_LONGEST) == V1_MAX  # the spec's worst case fits exactly
    h, used = parse_header(V1_UNKNOWN_LONGEST)  # type: ignore[misc]
    assert h.command == "LOCAL" and h.source is None and used == V1_MAX
    h, _ = parse_header(b"PROXY UNKNOWN\r\n")  # type: ignore[misc]
    assert h.family == "UNKNOWN"


@pytest.mark.parametrize(
    "bad",
    [
        b"GET / HTTP/1.1\r\n",  # no header at all: refused, never guessed
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",  # double space
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field missing
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # one too many
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # leading zero in an octet
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",  # leading zero in a port
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n",
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n",  # over 107 bytes
    ],
)
def test_v1_rejects(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_header(bad)
    with pytest.raises(RemoteProtocolError):
        feed_bytewise(bad)


def test_v1_fails_at_byte_108_without_waiting_for_more() -> None:
    r = ProxyHeaderReader()
    assert r.feed(b"PROXY UNKNOWN " + b"a" * (V1_MAX - 15)) is None  # 106 bytes: still possible
    with pytest.raises(RemoteProtocolError, match="longer than 107"):
        r.feed(b"a")


def test_wrong_first_byte_fails_at_once() -> None:
    with pytest.raises(RemoteProtocolError, match="no PROXY header"):
        ProxyHeaderReader().feed(b"h")
    with pytest.raises(RemoteProtocolError, match="no PROXY header"):
        ProxyHeaderReader().feed(b"PRX")
    with pytest.raises(RemoteProtocolError, match="signature"):
        ProxyHeaderReader().feed(b"\r\n\r\n\x00\r\nQUIX")


# -- version 2 ---------------------------------------------------------------------------


def test_v2_ipv4_with_tlvs_bytewise() -> None:
    data = encode_v2(("10.1.2.3", 4000), ("10.0.0.1", 443), tlvs=((0x01, b"h2"), (0x05, b"id")))
    header, rest = feed_bytewise(data + b"payload")
    assert header.version == 2 and header.family == "TCP4"
    assert header.source == ("10.1.2.3", 4000) and header.destination == ("10.0.0.1", 443)
    assert header.tlvs == ((0x01, b"h2"), (0x05, b"id"))
    assert rest == b"payload"


def test_v2_literal_bytes_ipv6_unix_local() -> None:
    body6 = ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("::1").packed
    data = V2_SIGNATURE + b"\x21\x21\x00\x24" + body6 + b"\x30\x39\x00\x50"
    h, used = parse_header(data)  # type: ignore[misc]
    assert (h.family, h.source, h.destination, used) == (
        "TCP6",
        ("2001:db8::7", 12345),
        ("::1", 80),
        52,
    )
    unix = b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")
    h, _ = parse_header(V2_SIGNATURE + b"\x21\x31" + (216).to_bytes(2, "big") + unix)  # type: ignore[misc]
    assert (h.family, h.source, h.destination) == ("UNIX", "/tmp/a", "/tmp/b")
    h, used = parse_header(V2_SIGNATURE + b"\x20\x00\x00\x00rest")  # type: ignore[misc]
    assert (h.command, h.source, used) == ("LOCAL", None, 16)
    h, _ = parse_header(V2_SIGNATURE + b"\x21\x00\x00\x00")  # type: ignore[misc]
    assert (h.command, h.family, h.source) == ("PROXY", "UNSPEC", None)


@pytest.mark.parametrize(
    "bad",
    [
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 header
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),  # family 4
        V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),  # transport 3
        V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11),  # shorter than IPv4 addresses
        V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # shorter than IPv6 addresses
        V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(14),  # 2 bytes: not a TLV
        V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05x",  # TLV overruns
    ],
)
def test_v2_rejects(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_header(bad)


def test_v2_waits_for_the_whole_body() -> None:
    data = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2))
    assert parse_header(data[:15]) is None
    assert parse_header(data[:-1]) is None
    parsed = parse_header(data)
    assert parsed is not None
    header, used = parsed
    assert used == len(data)
    assert (header.source, header.destination) == (("1.2.3.4", 1), ("5.6.7.8", 2))


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
@settings(max_examples=600, deadline=None)
def test_fuzz_only_remote_protocol_error(data: bytes, chunk: int) -> None:
    for prefix in (b"", V1_TCP4[:6], V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11"):
        blob = prefix + data
        # The same outcome whatever the chunking: fed whole, fed in pieces.
        outcomes = []
        for size in (len(blob) or 1, chunk):
            r = ProxyHeaderReader()
            try:
                for i in range(0, len(blob), size):
                    r.feed(blob[i : i + size])
            except RemoteProtocolError as exc:
                assert str(exc), "a protocol error must say what was wrong"
                outcomes.append("error")
                continue
            if r.header is None:
                assert r.rest == b""  # still waiting: nothing handed on
                outcomes.append("waiting")
            else:
                # A header was found: what follows it is handed on byte for byte.
                assert blob.endswith(r.rest)
                outcomes.append((r.header, r.rest))
        whole, pieces = outcomes
        assert whole == pieces, (whole, pieces)


@given(
    st.ip_addresses(v=4) | st.ip_addresses(v=6),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=20),
)
def test_fuzz_round_trip(addr: Any, sport: int, dport: int, tail: bytes) -> None:
    src, dst = (str(addr), sport), (str(addr), dport)
    for data in (encode_v1(src, dst), encode_v2(src, dst)):
        h, used = parse_header(data + tail)  # type: ignore[misc]
        assert (h.source, h.destination, used) == (src, dst, len(data))


# -- the server behind it ----------------------------------------------------------------


def talk(addr: tuple[str, int], data: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(addr, timeout=5, source_address=(source, 0)) as s:
        s.sendall(data)
        return s.recv(4096)


def test_server_sees_real_client_v1_and_v2(
    serve: Callable[..., ServerThread], server_logs: Any
) -> None:
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True)
    addr = srv.endpoints[0].address()
    reply = talk(addr, encode_v1(("203.0.113.9", 4711), ("198.51.100.1", 443)) + b"hi")  # type: ignore[arg-type]
    assert reply.split()[:4] == [b"203.0.113.9", b"4711", b"198.51.100.1", b"443"]
    assert reply.endswith(b" hi")
    reply = talk(addr, encode_v2(("2001:db8::5", 99), ("2001:db8::1", 80)) + b"v2")  # type: ignore[arg-type]
    assert reply.split()[:4] == [b"2001:db8::5", b"99", b"2001:db8::1", b"80"]
    # LOCAL (a proxy's health check): the connection's own addresses.
    reply = talk(addr, encode_v2(None, None) + b"local", source="127.0.0.3")  # type: ignore[arg-type]
    assert reply.split()[0] == b"127.0.0.3"
    server_logs.wait_for("open from 203.0.113.9:4711")
    server_logs.wait_for("open from [2001:db8::5]:99")


def test_header_split_across_segments_and_trailing_request(
    serve: Callable[..., ServerThread],
) -> None:
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, framing="line")
    data = encode_v1(("192.0.2.1", 1000), ("192.0.2.2", 21)) + b"one\ntwo\n"
    with socket.create_connection(srv.endpoints[0].address(), timeout=5) as s:  # type: ignore[arg-type]
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
        got = b""
        while got.count(b"\n") < 2:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
    lines = got.splitlines()
    assert lines[0].startswith(b"192.0.2.1 1000 ") and lines[0].endswith(b" one")
    assert lines[1].endswith(b" two")


def refused(addr: Any, data: bytes, source: str = "127.0.0.1", timeout: float = 5) -> bytes:
    """Send ``data`` and return what came back before the server closed (b'' if nothing)."""
    with socket.create_connection(addr, timeout=timeout, source_address=(source, 0)) as s:
        if data:
            s.sendall(data)
        out = b""
        while readable(s, timeout):
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk
        raise AssertionError("server kept the connection open")


def test_no_header_is_refused_not_guessed(
    serve: Callable[..., ServerThread], server_logs: Any
) -> None:
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True)
    addr = srv.endpoints[0].address()
    assert refused(addr, b"hello there\r\n") == b""
    assert refused(addr, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n") == b""
    server_logs.wait_for("PROXY header: no PROXY header", 1)
    assert not server_logs.errors()
    # the server still serves proper clients
    assert talk(addr, encode_v1(("192.0.2.8", 5), ("192.0.2.9", 6)) + b"x").startswith(
        b"192.0.2.8 "
    )  # type: ignore[arg-type]


def test_header_timeout(serve: Callable[..., ServerThread], server_logs: Any) -> None:
    srv = serve(whoami, "tcp://127.0.0.1:0", proxy_protocol=True, proxy_header_timeout=0.3)
    assert refused(srv.endpoints[0].address(), b"PROXY TCP4 1.2", timeout=5) == b""
    server_logs.wait_for("PROXY header: none within 0.3s")


def test_proxy_from_refuses_other_sources(
    serve: Callable[..., ServerThread], server_logs: Any
) -> None:
    srv = serve(
        whoami,
        "tcp://127.0.0.1:0",
        proxy_protocol=True,
        proxy_from=(parse_network("127.0.0.3/32"),),
    )
    addr = srv.endpoints[0].address()
    hdr = encode_v1(("192.0.2.1", 1), ("192.0.2.2", 2)) + b"x"
    assert refused(addr, hdr, source="127.0.0.1") == b""
    server_logs.wait_for("denied 127.0.0.1:")
    assert talk(addr, hdr, source="127.0.0.3").startswith(b"192.0.2.1 1 ")


def test_allow_deny_apply_to_the_real_client(
    serve: Callable[..., ServerThread], server_logs: Any
) -> None:
    srv = serve(
        whoami,
        "tcp://127.0.0.1:0",
        proxy_protocol=True,
        allow=(parse_network("192.0.2.0/24"),),
    )
    addr = srv.endpoints[0].address()
    ok = encode_v1(("192.0.2.77", 1), ("127.0.0.1", 2)) + b"x"
    assert talk(addr, ok).startswith(b"192.0.2.77 ")
    bad = encode_v1(("198.51.100.1", 1), ("127.0.0.1", 2)) + b"x"
    assert refused(addr, bad) == b""
    server_logs.wait_for("denied 198.51.100.1:1 (via proxy 127.0.0.1:")


def test_unix_endpoint_behind_proxy(serve: Callable[..., ServerThread], sock_dir: Any) -> None:
    path = str(sock_dir / "p.sock")
    serve(whoami, f"unix://{path}", proxy_protocol=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(encode_v2(("192.0.2.44", 7), ("192.0.2.1", 8)) + b"u")
        assert s.recv(4096).startswith(b"192.0.2.44 7 192.0.2.1 8 ")


def test_tls_with_proxy_protocol_is_a_config_error() -> None:
    from sockserve.errors import ConfigError
    from sockserve.server import Server, ServerConfig, make_binding

    cfg = ServerConfig(proxy_protocol=True, tls_cert="/nonexistent.pem")
    with pytest.raises(ConfigError):
        ServerThread(Server(make_binding(whoami, ["tls://127.0.0.1:0"], cfg))).start()


def test_plain_asyncio_loop_too() -> None:
    """The hand-over relies on transport.set_protocol: check the stdlib loop as well as uvloop."""
    from sockserve.server import Server, ServerConfig, make_binding

    cfg = ServerConfig(proxy_protocol=True)
    srv = Server(make_binding(whoami, ["tcp://127.0.0.1:0"], cfg))
    with ServerThread(srv, loop_kind="asyncio") as st:
        reply = talk(
            st.endpoints[0].address(), encode_v2(("192.0.2.5", 50), ("192.0.2.6", 60)) + b"a"
        )  # type: ignore[arg-type]
        assert reply.startswith(b"192.0.2.5 50 192.0.2.6 60 ")
