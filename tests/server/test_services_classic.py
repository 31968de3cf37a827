"""The classic inetd services (RFCs 862-868) on real sockets, every transport they serve."""

from __future__ import annotations

import calendar
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from classic_helpers import (
    ALL_BYTES_MIB,
    DAYTIME,
    RFC868_OFFSET,
    chargen_reference,
    connect,
    datagram,
    endpoint,
    read_exactly,
    read_until_eof,
    session_buffers,
    stream_through,
    udp_ask,
)
from strict import needs_ipv6
from support import ServerProcess, run_cli

from sockserve.errors import ConfigError
from sockserve.server import ServerConfig, ServerThread, make_binding
from sockserve.services.qotd import BUILTIN_QUOTES
from sockserve.services.time import time_bytes

Serve = Callable[..., ServerThread]
CLASSIC = ("echo", "discard", "chargen", "daytime", "time", "qotd")
BUILTIN_QUOTE_BYTES = {q.replace("\n", "\r\n").encode() + b"\r\n" for q in BUILTIN_QUOTES}


@pytest.fixture(params=["tcp4", pytest.param("tcp6", marks=needs_ipv6), "unix"])
def stream_url(request: pytest.FixtureRequest, sock_dir: Path) -> str:
    """One stream endpoint of each kind: IPv4, IPv6 and a Unix path."""
    return {
        "tcp4": "tcp://127.0.0.1:0",
        "tcp6": "tcp://[::1]:0",
        "unix": f"unix://{sock_dir}/classic.sock",
    }[str(request.param)]


@pytest.fixture(params=["udp4", pytest.param("udp6", marks=needs_ipv6), "unixgram"])
def dgram_url(request: pytest.FixtureRequest, sock_dir: Path) -> str:
    return {
        "udp4": "udp://127.0.0.1:0",
        "udp6": "udp://[::1]:0",
        "unixgram": f"unixgram://{sock_dir}/classic-dg.sock",
    }[str(request.param)]


def check_daytime(line: bytes) -> None:
    """The BSD inetd form, local time, within 2 s of our clock."""
    assert DAYTIME.fullmatch(line), line
    stamp = time.mktime(time.strptime(line.decode().strip(), "%a %b %d %H:%M:%S %Y"))
    assert abs(stamp - time.time()) <= 2


def check_time(reply: bytes) -> None:
    assert len(reply) == 4, reply
    (value,) = struct.unpack("!I", reply)
    assert abs(value - (int(time.time()) + RFC868_OFFSET) % 2**32) <= 2


def check_quote(reply: bytes, quotes: set[bytes]) -> None:
    assert reply in quotes, reply
    assert len(reply) < 512
    assert all(0x20 <= b <= 0x7E for b in reply.replace(b"\r\n", b""))


# -- echo (RFC 862) ------------------------------------------------------------------------


def test_echo_streams_a_mebibyte_of_every_byte_value(serve: Serve, stream_url: str) -> None:
    st = serve("echo", stream_url)
    with connect(st.endpoints[0]) as s:
        assert stream_through(s, ALL_BYTES_MIB) == ALL_BYTES_MIB


def test_echo_answers_data_sent_before_a_half_close(serve: Serve) -> None:
    st = serve("echo", "tcp://127.0.0.1:0")
    with connect(st.endpoints[0]) as s:
        s.sendall(b"last words\x00\xff")
        s.shutdown(socket.SHUT_WR)
        assert read_until_eof(s) == b"last words\x00\xff"


def test_echo_pushes_back_on_a_client_that_does_not_read(serve: Serve) -> None:
    """Flow control, not buffering: the server stops reading once its replies pass the
    high-water mark, so the client's sends stall; then every byte still comes back."""
    high = 64 * 1024
    st = serve("echo", "tcp://127.0.0.1:0", write_high_water=high, write_low_water=16 * 1024)
    payload = ALL_BYTES_MIB * 64  # far more than all the buffers on the way hold
    with connect(st.endpoints[0]) as s:
        s.setblocking(False)
        sent = 0
        while sent < len(payload):
            _, writable, _ = select.select([], [s], [], 0.5)
            if not writable:
                break  # stalled: nobody is reading at the far end
            sent += s.send(payload[sent : sent + 65536])
        assert sent < len(payload), "64 MiB went in without the server pushing back"
        buffered = [size for size, _ in session_buffers(st)]
        assert len(buffered) == 1
        print(f"echo stalled after {sent} bytes; server buffer {buffered[0]}, high-water {high}")
        assert buffered[0] <= high + 256 * 1024  # the mark plus at most one read
        s.settimeout(5)
        s.shutdown(socket.SHUT_WR)
        assert read_until_eof(s, limit=sent) == payload[:sent]


def test_echo_datagram_comes_back_unchanged(serve: Serve, dgram_url: str, sock_dir: Path) -> None:
    st = serve("echo", dgram_url)
    assert udp_ask(st.endpoints[0], bytes(range(256)), sock_dir) == bytes(range(256))


# -- discard (RFC 863) ---------------------------------------------------------------------


def test_discard_keeps_the_connection_open_and_never_replies(serve: Serve, stream_url: str) -> None:
    st = serve("discard", stream_url)
    with connect(st.endpoints[0]) as s:
        s.sendall(ALL_BYTES_MIB)
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(1)  # neither data nor EOF: still open, silent
        s.settimeout(5)
        s.sendall(b"more")  # and still taking data
        s.shutdown(socket.SHUT_WR)
        assert read_until_eof(s) == b""  # everything read, nothing sent back


def test_discard_datagram_gets_no_reply(serve: Serve) -> None:
    st = serve("discard", "udp://127.0.0.1:0", "tcp://127.0.0.1:0")
    with datagram(endpoint(st, "udp"), b"drop me") as s:
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(100)


# -- chargen (RFC 864) ---------------------------------------------------------------------


def test_chargen_streams_eight_mebibytes_of_the_pattern(serve: Serve, stream_url: str) -> None:
    st = serve("chargen", stream_url)
    n = 8 << 20
    with connect(st.endpoints[0]) as s:
        assert read_exactly(s, n) == chargen_reference(n)


def test_chargen_keeps_streaming_after_a_half_close(serve: Serve) -> None:
    """Like BSD inetd: a half-close only means the client has nothing to say. (A small
    high-water mark makes flow control pause and resume many times after the EOF.)"""
    st = serve("chargen", "tcp://127.0.0.1:0", write_high_water=16384, write_low_water=4096)
    with connect(st.endpoints[0]) as s:
        s.sendall(b"ignored input")
        s.shutdown(socket.SHUT_WR)
        assert read_exactly(s, 2 << 20) == chargen_reference(2 << 20)


def test_chargen_slow_reader_costs_at_most_the_high_water_mark(serve: Serve) -> None:
    """Resource bound: whatever the reader's pace, the server's user-space buffer for it
    stays at or under the high-water mark plus one byte, and the stream stays exact."""
    high, low = 64 * 1024, 16 * 1024
    st = serve("chargen", "tcp://127.0.0.1:0", write_high_water=high, write_low_water=low)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow, small-windowed reader
    s.settimeout(5)
    s.connect(st.endpoints[0].address())
    with s:
        deadline = time.monotonic() + 10
        while not (conns := session_buffers(st)) or conns[0][1]:
            assert time.monotonic() < deadline, "the server never filled its buffer"
        peak = conns[0][0]
        received = bytearray()
        while len(received) < 2 << 20:  # 2 MiB in 4 KiB sips: many pause/resume cycles
            received += s.recv(4096)
            peak = max(peak, session_buffers(st)[0][0])
        print(f"chargen slow reader: peak server buffer {peak} bytes, high-water {high}")
        assert high < peak <= high + 1, peak  # README: the mark plus one byte
        assert bytes(received) == chargen_reference(len(received))


def test_chargen_datagrams_hold_0_to_512_characters_of_the_pattern(serve: Serve) -> None:
    st = serve("chargen", "udp://127.0.0.1:0")
    pattern = chargen_reference(95 * 74 + 600)
    line_starts = {pattern[i * 74 : i * 74 + 600] for i in range(95)}
    sizes = set()
    with datagram(st.endpoints[0], b"") as s:
        for i in range(40):
            if i:
                s.sendto(b"", st.endpoints[0].address())
            reply = s.recv(65536)
            assert len(reply) <= 512
            assert any(start.startswith(reply) for start in line_starts), reply
            sizes.add(len(reply))
    assert len(sizes) > 1  # random lengths, as RFC 864 says


# -- daytime (RFC 867), time (RFC 868), qotd (RFC 865): answer, then close -----------------


def test_daytime_sends_one_ctime_line_then_closes(serve: Serve, stream_url: str) -> None:
    st = serve("daytime", stream_url)
    with connect(st.endpoints[0]) as s:
        check_daytime(read_until_eof(s))


def test_daytime_datagram(serve: Serve, dgram_url: str, sock_dir: Path) -> None:
    st = serve("daytime", dgram_url)
    check_daytime(udp_ask(st.endpoints[0], b"", sock_dir))


def test_time_sends_four_bytes_within_two_seconds_then_closes(
    serve: Serve, stream_url: str
) -> None:
    st = serve("time", stream_url)
    with connect(st.endpoints[0]) as s:
        check_time(read_until_eof(s))


def test_time_answers_the_empty_datagram(serve: Serve, dgram_url: str, sock_dir: Path) -> None:
    st = serve("time", dgram_url)
    check_time(udp_ask(st.endpoints[0], b"", sock_dir))


def test_time_wraps_modulo_2_to_the_32_in_2036() -> None:
    wrap = calendar.timegm((2036, 2, 7, 6, 28, 16))  # 2**32 seconds after 1900-01-01
    assert time_bytes(wrap - 1) == b"\xff\xff\xff\xff"
    assert time_bytes(wrap) == b"\x00\x00\x00\x00"
    assert time_bytes(0) == struct.pack("!I", RFC868_OFFSET)


def test_qotd_sends_one_builtin_quote_then_closes(serve: Serve, stream_url: str) -> None:
    st = serve("qotd", stream_url)
    with connect(st.endpoints[0]) as s:
        check_quote(read_until_eof(s), BUILTIN_QUOTE_BYTES)


def test_qotd_datagram(serve: Serve, dgram_url: str, sock_dir: Path) -> None:
    st = serve("qotd", dgram_url)
    check_quote(udp_ask(st.endpoints[0], b"", sock_dir), BUILTIN_QUOTE_BYTES)


def test_qotd_serves_the_users_quotes(serve: Serve, tmp_path: Path) -> None:
    quotes = tmp_path / "quotes.txt"
    quotes.write_text("First one.\n  - someone\n%\nSecond one.\n\n\nThird,\non two lines.\n")
    mine = {b"First one.\r\n  - someone\r\n", b"Second one.\r\n", b"Third,\r\non two lines.\r\n"}
    st = serve("qotd", "tcp://127.0.0.1:0", service_options={"quotes": str(quotes)})
    seen = set()
    for _ in range(60):
        with connect(st.endpoints[0]) as s:
            reply = read_until_eof(s)
        check_quote(reply, mine)
        seen.add(reply)
    assert len(seen) > 1  # picks among them


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("fine\n\ncaf\u00e9\n", "not ASCII"),
        ("fine\n%\ntab\there\n", "line 3"),
        ("x" * 600 + "\n", "under 512"),
        ("\n%\n\n", "no quotes"),
    ],
)
def test_qotd_rejects_a_bad_quotes_file_at_start(
    tmp_path: Path, content: str, complaint: str
) -> None:
    quotes = tmp_path / "quotes.txt"
    quotes.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=complaint):
        make_binding(
            "qotd", ["tcp://127.0.0.1:0"], ServerConfig(service_options={"quotes": str(quotes)})
        )


def test_options_for_a_service_without_any_are_refused() -> None:
    with pytest.raises(ConfigError, match="echo takes no options"):
        make_binding("echo", ["tcp://127.0.0.1:0"], ServerConfig(service_options={"quotes": "x"}))


# -- UDP amplification guard ---------------------------------------------------------------

# A non-loopback source exists only inside a private network namespace (tests/netns.py):
# the server and the client both run there, nothing is sent to this host's own addresses.


@pytest.mark.parametrize(
    ("name", "request_bytes", "expect"),
    [
        ("qotd", b"0123456789", lambda r: len(r) == 10),
        ("daytime", b"abc", lambda r: len(r) == 3 and r[:3].isalpha()),
        ("daytime", b"x" * 26, lambda r: DAYTIME.fullmatch(r) is not None),
        ("chargen", b"x" * 20, lambda r: len(r) <= 20),
        ("time", b"abcd", lambda r: len(r) == 4),
        ("time", b"abc", lambda r: len(r) == 3),  # one byte larger is too large
        ("echo", b"x" * 3000, lambda r: r == b"x" * 3000),
        ("timestamp", b"ping", lambda r: r.startswith(b"[") and r.endswith(b"] ping")),
    ],
)
def test_udp_reply_to_a_remote_source_is_no_larger_than_the_request(
    netns: str, serve: Serve, name: str, request_bytes: bytes, expect: Callable[[bytes], bool]
) -> None:
    """A source outside 127/8 gets at most as many bytes as it sent from the amplifiers
    (truncated); echo is never larger anyway; timestamp is deliberately not guarded."""
    st = serve(name, f"udp://{netns}:0")
    reply = udp_ask(st.endpoints[0], request_bytes, bind=(netns, 0))
    assert expect(reply), reply
    if name != "timestamp":
        assert len(reply) <= len(request_bytes)


def test_udp_guard_drops_a_reply_that_would_be_empty(netns: str, serve: Serve) -> None:
    st = serve("time", f"udp://{netns}:0")
    with datagram(st.endpoints[0], b"", bind=(netns, 0)) as s:
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(100)


@pytest.mark.parametrize("name", ["qotd", "time"])
def test_udp_amplify_lets_remote_sources_have_the_whole_reply(
    netns: str, serve: Serve, name: str
) -> None:
    st = serve(name, f"udp://{netns}:0", udp_amplify=True)
    reply = udp_ask(st.endpoints[0], b"", bind=(netns, 0))
    if name == "qotd":
        check_quote(reply, BUILTIN_QUOTE_BYTES)
    else:
        check_time(reply)


def test_loopback_sources_get_the_whole_reply_without_udp_amplify(serve: Serve) -> None:
    st = serve("qotd", "udp://127.0.0.1:0")
    check_quote(udp_ask(st.endpoints[0], b"?"), BUILTIN_QUOTE_BYTES)


# -- the CLI -------------------------------------------------------------------------------


def test_services_lists_each_with_its_port_without_importing_it() -> None:
    ports = {"echo": 7, "discard": 9, "daytime": 13, "qotd": 17, "chargen": 19, "time": 37}
    rfcs = {"echo": 862, "discard": 863, "daytime": 867, "qotd": 865, "chargen": 864, "time": 868}
    code = (
        "import sys; from sockserve.cli.main import main; rc = main(['services']); "
        "loaded = [m for m in sys.modules if m.startswith('sockserve.services.')]; "
        "print('LOADED', loaded); sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=20, check=True, text=True
    ).stdout
    assert "LOADED []" in out
    for name, port in ports.items():
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert line.split()[1] == str(port)
        assert f"RFC {rfcs[name]}:" in line


@pytest.mark.parametrize("name", CLASSIC)
def test_sockserve_serve_name_runs_each_service(name: str) -> None:
    with ServerProcess(name, "--listen", "tcp://127.0.0.1:0", "--listen", "udp://127.0.0.1:0") as p:
        assert f"({name}, stream)" in p.lines[0]
        tcp = p.url("tcp").removeprefix("tcp://").rsplit(":", 1)
        addr: Any = (tcp[0], int(tcp[1]))
        with socket.create_connection(addr, timeout=5) as s:
            if name == "echo":
                s.sendall(b"hi")
                s.shutdown(socket.SHUT_WR)
                assert read_until_eof(s) == b"hi"
            elif name == "discard":
                s.shutdown(socket.SHUT_WR)
                assert read_until_eof(s) == b""
            elif name == "chargen":
                assert read_exactly(s, 1000) == chargen_reference(1000)
            elif name == "daytime":
                check_daytime(read_until_eof(s))
            elif name == "time":
                check_time(read_until_eof(s))
            else:
                check_quote(read_until_eof(s), BUILTIN_QUOTE_BYTES)


def test_serve_quotes_option(tmp_path: Path) -> None:
    quotes = tmp_path / "q.txt"
    quotes.write_text("Only this one.\n")
    with ServerProcess("qotd", "--quotes", str(quotes), "--listen", "tcp://127.0.0.1:0") as p:
        host, port = p.url("tcp").removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            assert read_until_eof(s) == b"Only this one.\r\n"


def test_serve_quotes_option_with_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    r = run_cli(
        "serve", "qotd", "--quotes", str(tmp_path / "nope.txt"), "--listen", "tcp://127.0.0.1:0"
    )
    assert r.returncode == 2
    assert b"cannot read quotes file" in r.stderr and b"nope.txt" in r.stderr
