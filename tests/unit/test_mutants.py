"""Issue 14, part 2: unit tests that kill the mutants mutmut makes in the modules where one
wrong comparison is a security or correctness bug (``scripts/mutation MODULE``).

Exact boundaries and exact messages: the messages are what an operator reads in the log
(or a CLI user on stderr) when a peer misbehaves, so they are part of the contract.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

import sockserve.framing as framing
from sockserve.errors import ConfigError, LocalProtocolError, MessageTooLarge, RemoteProtocolError
from sockserve.framing import DEFAULT_MAX_MESSAGE, FRAMINGS, codec_factory, make_codec
from sockserve.framing.length import MAX_FRAME, LengthCodec
from sockserve.framing.line import LineCodec
from sockserve.framing.raw import RawCodec

CODECS = (RawCodec, LineCodec, LengthCodec)


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


# -- every codec -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CODECS)
def test_codec_cap_defaults_to_64_kib_and_must_be_positive(cls: type) -> None:
    assert DEFAULT_MAX_MESSAGE == 65536
    assert cls().max_message == 65536
    assert cls(1).max_message == 1
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"^max_message must be positive$"):
            cls(bad)


@pytest.mark.parametrize("cls", CODECS)
def test_encode_refuses_a_reply_that_is_not_bytes(cls: type) -> None:
    codec = cls()
    for bad, name in (("text", "str"), (7, "int"), (None, "NoneType")):
        with pytest.raises(LocalProtocolError, match=rf"^reply must be bytes, not {name}$"):
            codec.encode(bad)
    for ok in (bytearray(b"ab"), memoryview(b"ab")):
        out = codec.encode(ok)
        assert type(out) is bytes and b"ab" in out


# -- raw ----------------------------------------------------------------------------------


def test_raw_splits_a_chunk_over_the_cap_into_cap_sized_requests() -> None:
    c = RawCodec(3)
    c.feed(b"")
    assert c.next_message() is None and c.buffered == 0
    c.feed(b"abc")  # exactly the cap: one request
    assert c.buffered == 3
    assert c.next_message() == b"abc" and c.next_message() is None
    c.feed(b"abcdefg")
    assert c.buffered == 7
    assert [c.next_message() for _ in range(4)] == [b"abc", b"def", b"g", None]
    c.feed(b"x")
    c.feed(b"y")
    assert c.next_message() == b"x" and c.next_message() == b"y"
    assert c.end_of_input() is None
    assert RawCodec().encode(b"hi") == b"hi"


# -- line ---------------------------------------------------------------------------------


def test_line_takes_exactly_the_cap_with_either_line_end() -> None:
    for end in (b"\n", b"\r\n"):
        c = LineCodec(4)
        c.feed(b"abcd" + end)
        assert c.next_message() == b"abcd" and c.buffered == 0
        assert c.next_message() is None
    c = LineCodec(4)
    c.feed(b"abcde\n")
    with pytest.raises(MessageTooLarge, match=r"^line of 5 bytes exceeds the 4-byte cap$"):
        c.next_message()


def test_line_strips_one_cr_and_only_before_the_newline() -> None:
    c = LineCodec()
    c.feed(b"a\r\r\nb\rc\n\n\r\n")
    assert [c.next_message() for _ in range(5)] == [b"a\r", b"b\rc", b"", b"", None]
    c.feed(b"\n")  # a newline at index 0 has no CR before it
    assert c.next_message() == b""


def test_line_without_newline_fails_once_past_cap_plus_two() -> None:
    c = LineCodec(4)
    c.feed(b"abcdef")  # cap + 2: may still be "abcd\r\n" arriving
    assert c.next_message() is None and c.buffered == 6
    msg = r"^line longer than 4 bytes without a newline$"
    with pytest.raises(MessageTooLarge, match=msg):
        c.feed(b"g")
    c = LineCodec(4)
    c.feed(b"ok\n" + b"abcdefg")  # an over-long rest behind a whole line
    assert c.next_message() == b"ok"
    with pytest.raises(MessageTooLarge, match=msg):
        c.next_message()


def test_line_scan_resumes_where_it_stopped() -> None:
    c = LineCodec(10)
    for ch in b"abc":
        c.feed(bytes([ch]))
        assert c.next_message() is None
    c.feed(b"\nxy\n")
    assert c.next_message() == b"abc"
    assert c.next_message() == b"xy"
    c.feed(b"z")
    assert c.next_message() is None
    c.feed(b"\n")
    assert c.next_message() == b"z"


def test_line_last_line_at_eof() -> None:
    c = LineCodec(3)
    assert c.end_of_input() is None
    c.feed(b"abc\r")
    assert c.end_of_input() == b"abc" and c.buffered == 0
    assert c.end_of_input() is None
    c.feed(b"abc")
    assert c.end_of_input() == b"abc"
    c.feed(b"abcd")
    with pytest.raises(MessageTooLarge, match=r"^last line of 4 bytes exceeds the 3-byte cap$"):
        c.end_of_input()
    c = LineCodec(3)
    c.feed(b"ab")
    c.next_message()
    c.feed(b"c\n")  # the scan offset is reset by end_of_input too
    assert c.next_message() == b"abc"
    c.feed(b"x")
    assert c.next_message() is None
    assert c.end_of_input() == b"x"
    c.feed(b"y\n")
    assert c.next_message() == b"y"
    assert LineCodec().encode(b"hi") == b"hi\n"


# -- length -------------------------------------------------------------------------------


def test_length_prefix_is_checked_before_the_body_arrives() -> None:
    c = LengthCodec(5)
    c.feed((5).to_bytes(4, "big"))
    assert c.next_message() is None and c.buffered == 4
    c.feed(b"abcde")
    assert c.next_message() == b"abcde" and c.buffered == 0
    with pytest.raises(MessageTooLarge, match=r"^frame length 6 exceeds the 5-byte cap$"):
        c.feed((6).to_bytes(4, "big"))
    c = LengthCodec(2**31)
    with pytest.raises(MessageTooLarge, match=r"^frame length 4294967295 exceeds"):
        c.feed(b"\xff\xff\xff\xff")


def test_length_frames_split_anywhere_and_back_to_back() -> None:
    c = LengthCodec()
    data = _frame(b"one") + _frame(b"") + _frame(b"three")
    for i in range(len(data)):
        c.feed(data[i : i + 1])
    assert [c.next_message() for _ in range(4)] == [b"one", b"", b"three", None]
    c.feed(b"\x00\x00")
    assert c.next_message() is None and c.buffered == 2
    c.feed(b"\x00\x01z")
    assert c.next_message() == b"z"


def test_length_good_frame_before_a_bad_prefix_is_handed_out() -> None:
    c = LengthCodec(3)
    c.feed(_frame(b"abc") + (9).to_bytes(4, "big"))
    assert c.next_message() == b"abc"
    with pytest.raises(MessageTooLarge):
        c.next_message()


def test_length_eof_inside_a_frame_says_where() -> None:
    c = LengthCodec()
    assert c.end_of_input() is None
    c.feed(b"\x00\x00")
    with pytest.raises(
        RemoteProtocolError,
        match=r"^connection closed inside a frame: 2 bytes of a 4-byte length prefix$",
    ):
        c.end_of_input()
    c = LengthCodec()
    c.feed(_frame(b"abcdef")[:7])
    with pytest.raises(
        RemoteProtocolError,
        match=r"^connection closed inside a frame: 3 bytes of a 6-byte body$",
    ):
        c.end_of_input()
    c = LengthCodec()
    c.feed(_frame(b""))  # a whole empty frame not yet taken: still inside it
    c.feed(b"")
    assert c.buffered == 4
    assert c.next_message() == b""
    assert c.end_of_input() is None
    c.feed((0).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match=r"0 bytes of a 0-byte body"):
        c.end_of_input()


def test_length_encode_prefixes_the_length() -> None:
    c = LengthCodec()
    assert c.encode(b"") == b"\x00\x00\x00\x00"
    assert c.encode(b"ab") == b"\x00\x00\x00\x02ab"
    assert c.encode(bytearray(300)) == b"\x00\x00\x01\x2c" + bytes(300)  # type: ignore[arg-type]  # any bytes-like is taken
    assert MAX_FRAME == 2**32 - 1


class _Huge(bytes):
    """A reply claiming more bytes than a 4-byte prefix can express (none is allocated)."""

    def __len__(self) -> int:
        return MAX_FRAME + 1


def test_length_encode_refuses_what_the_prefix_cannot_express() -> None:
    with pytest.raises(
        LocalProtocolError, match=rf"^message of {MAX_FRAME + 1} bytes cannot be length-prefixed$"
    ):
        LengthCodec().encode(_Huge(b"x"))


# -- the framing registry -------------------------------------------------------------------


def test_framings_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(framing, "_factories", {})  # load each codec module afresh
    assert list(FRAMINGS) == ["raw", "line", "length"]
    for name, cls in (("raw", RawCodec), ("line", LineCodec), ("length", LengthCodec)):
        assert codec_factory(name) is cls
        assert codec_factory(name) is cls  # cached
        codec = make_codec(name, 7)
        assert type(codec) is cls and codec.max_message == 7 and codec.name == name
        assert make_codec(name).max_message == DEFAULT_MAX_MESSAGE
        assert getattr(framing, cls.__name__) is cls
    with pytest.raises(
        ConfigError, match=r"^unknown framing 'xml'; expected one of raw, line, length$"
    ):
        make_codec("xml")
    with pytest.raises(
        AttributeError, match=r"^module 'sockserve.framing' has no attribute 'Nope'$"
    ):
        framing.Nope  # noqa: B018


# -- access control -------------------------------------------------------------------------

from sockserve._engine.guards import AccessControl  # noqa: E402


def _nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def test_access_without_rules_lets_everyone_in() -> None:
    ac = AccessControl((), ())
    assert not ac.active
    for host in ("10.0.0.1", "::1", "/run/x.sock", "", "not an address"):
        assert ac.permits(host)


def test_access_allow_deny_and_deny_wins() -> None:
    ac = AccessControl(_nets("10.0.0.0/8"), _nets("10.1.0.0/16"))
    assert ac.active
    assert ac.permits("10.2.3.4")
    assert not ac.permits("10.1.2.3")  # denied inside the allowed network
    assert not ac.permits("11.0.0.1")  # not allowed
    assert AccessControl((), _nets("10.1.0.0/16")).active
    assert AccessControl(_nets("10.0.0.0/8"), ()).active
    deny_only = AccessControl((), _nets("10.1.0.0/16"))
    assert deny_only.permits("11.0.0.1") and not deny_only.permits("10.1.0.1")


def test_access_fails_closed_for_what_is_not_an_address() -> None:
    for ac in (AccessControl(_nets("0.0.0.0/0"), ()), AccessControl((), _nets("10.0.0.0/8"))):
        for host in ("/run/x.sock", "", "host.example"):
            assert not ac.permits(host)


def test_access_ignores_the_zone_of_a_link_local_address() -> None:
    ac = AccessControl((), _nets("fe80::/10"))
    assert not ac.permits("fe80::1%eth0")
    assert AccessControl(_nets("fe80::/10"), ()).permits("fe80::1%lo%x")


def test_access_ipv4_however_spelled() -> None:
    plain = AccessControl((), _nets("10.0.0.0/8"))
    assert not plain.permits("::ffff:10.1.2.3")  # a mapped client meets a plain rule
    mapped = AccessControl((), _nets("::ffff:10.0.0.0/104"))
    assert not mapped.permits("10.1.2.3")  # a mapped rule meets a plain client
    assert not mapped.permits("::ffff:10.1.2.3")
    assert mapped.permits("11.0.0.1") and mapped.permits("::ffff:11.0.0.1")
    allow = AccessControl(_nets("::ffff:10.0.0.0/104"), ())
    assert allow.permits("10.255.0.1") and not allow.permits("11.0.0.1")
    host = AccessControl((), _nets("::ffff:127.0.0.2/128"))
    assert not host.permits("127.0.0.2") and host.permits("127.0.0.3")
    # A plain IPv6 rule stays IPv6; the IPv4 network it does not spell is untouched.
    v6 = AccessControl((), _nets("::/96"))
    assert not v6.permits("::5") and v6.permits("0.0.0.5")
    whole = AccessControl((), _nets("::ffff:0:0/96"))
    assert not whole.permits("1.2.3.4") and whole.permits("2001:db8::1")


# -- config files ---------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from sockserve.deploy.configfile import OPTION_KEYS, load_config_file, parse_config  # noqa: E402
from sockserve.server import ServerConfig  # noqa: E402

W = "f.toml: [[service]] #1 (echo)"


def _one(**table: object) -> ServerConfig:
    (entry,) = parse_config({"service": [{"name": "echo", **table}]}, "f.toml")
    return entry.config


def _refused(message: str, **table: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"service": [{"name": "echo", **table}]}, "f.toml")
    assert str(info.value) == message


def test_config_file_each_option_converts_its_value() -> None:
    c = _one(
        framing="line",
        max_message="64K",
        idle_timeout=2,
        max_conns=5,
        backlog=7,
        drain_timeout=1.5,
        allow="10.0.0.0/8",
        deny=["10.1.0.0/16", "::1/128"],
        unix_mode="660",
        max_handshakes=3,
        udp_rate=4,
        udp_min_source_port=2000,
        udp_amplify=True,
        proxy_protocol=True,
        proxy_from=["127.0.0.1/32"],
        proxy_header_timeout=2,
        trace=True,
        options={"a": 1},
    )
    assert c.framing == "line" and c.max_message == 65536 and c.idle_timeout == 2.0
    assert c.max_conns == 5 and c.backlog == 7 and c.drain_timeout == 1.5
    assert c.allow == _nets("10.0.0.0/8") and c.deny == _nets("10.1.0.0/16", "::1/128")
    assert c.unix_mode == 0o660 and c.max_handshakes == 3 and c.udp_rate == 4.0
    assert c.udp_min_source_port == 2000 and c.udp_amplify is True
    assert c.proxy_protocol is True and c.proxy_from == _nets("127.0.0.1/32")
    assert c.proxy_header_timeout == 2.0 and c.trace is True
    assert dict(c.service_options) == {"a": 1}
    assert _one(max_message=1000).max_message == 1000
    assert _one(unix_mode=600).unix_mode == 0o600  # TOML integer, octal digits
    assert _one(idle_timeout=0).idle_timeout is None  # 0 = never
    assert type(_one(udp_rate=4).udp_rate) is float
    for key in ("tls_cert", "tls_key", "tls_client_ca", "tls_handshake_timeout"):
        assert key in OPTION_KEYS


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("max_message", True, 'expected bytes, e.g. 65536 or "64K"'),
        ("max_message", 1.5, 'expected bytes, e.g. 65536 or "64K"'),
        ("idle_timeout", "5", "expected a number"),
        ("drain_timeout", False, "expected a number"),
        ("max_conns", 1.0, "expected an integer"),
        ("backlog", True, "expected an integer"),
        ("udp_amplify", 1, "expected true or false"),
        ("framing", 3, "expected a string"),
        ("allow", [1], "expected a list of CIDR strings"),
        ("deny", {"a": 1}, "expected a list of CIDR strings"),
        ("options", [], 'expected a table, e.g. options = { quote = "..." }'),
        ("unix_mode", 1.5, "expected a string"),
    ],
)
def test_config_file_wrong_type_names_the_key(key: str, value: object, why: str) -> None:
    _refused(f"{W}: key {key!r}: {why}", **{key: value})


def test_config_file_bad_tables_and_keys() -> None:
    bad_tables: tuple[dict[str, Any], ...] = ({}, {"service": []}, {"service": {"name": "echo"}})
    for data in bad_tables:
        with pytest.raises(ConfigError) as info:
            parse_config(data, "f.toml")
        assert str(info.value) == "f.toml: no [[service]] tables; add at least one"
    with pytest.raises(ConfigError) as info:
        parse_config({"service": [{"name": "echo"}], "zz": 1, "aa": 2}, "f.toml")
    assert str(info.value) == (
        "f.toml: unknown top-level key 'aa'; services go in [[service]] tables"
    )
    with pytest.raises(ConfigError) as info:
        parse_config({"service": [{"name": "echo"}, "x"]}, "f.toml")
    assert str(info.value) == "f.toml: [[service]] #2: expected a table"
    for name in (None, "", 3):
        table = {} if name is None else {"name": name}
        with pytest.raises(ConfigError) as info:
            parse_config({"service": [table]}, "f.toml")
        assert str(info.value) == (
            "f.toml: [[service]] #1: key 'name' is required: a built-in service or module:function"
        )
    keys = "name, listen, socket, " + ", ".join(OPTION_KEYS)
    _refused(f"{W}: unknown key 'bogus'; expected one of {keys}", zzz=1, bogus=2)
    _refused(f"{W}: key 'listen': expected a list of endpoint URLs", listen=5)
    _refused(f"{W}: key 'listen': expected a list of endpoint URLs", listen=["tcp://a:1", 2])
    with pytest.raises(ConfigError, match=r"^f\.toml: \[\[service\]\] #1 \(echo\): key 'listen': "):
        parse_config({"service": [{"name": "echo", "listen": ["ftp://x:1"]}]}, "f.toml")
    _refused(f"{W}: key 'socket': expected a string (a FileDescriptorName)", socket=["a"])
    with pytest.raises(ConfigError, match=r"^f\.toml: \[\[service\]\] #1 \(echo\): "):
        parse_config({"service": [{"name": "echo", "backlog": 0}]}, "f.toml")
    with pytest.raises(
        ConfigError, match=r"^f\.toml: \[\[service\]\] #1 \(echo\): key 'max_message': "
    ):
        parse_config({"service": [{"name": "echo", "max_message": "lots"}]}, "f.toml")


def test_config_file_listen_socket_and_duplicates() -> None:
    entries = parse_config(
        {
            "service": [
                {"name": "echo", "listen": "tcp://127.0.0.1:7007"},
                {"name": "qotd", "listen": ["udp://127.0.0.1:7007"], "socket": "q"},
                {"name": "discard"},
            ]
        },
        "f.toml",
    )
    assert [e.spec for e in entries] == ["echo", "qotd", "discard"]
    assert [str(ep) for ep in entries[0].endpoints] == ["tcp://127.0.0.1:7007"]
    assert [e.socket for e in entries] == ["echo", "q", "discard"]
    assert entries[1].where == "f.toml: [[service]] #2 (qotd)"
    assert entries[2].endpoints == ()
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "service": [
                    {"name": "echo", "listen": "tcp://127.0.0.1:7007"},
                    {"name": "qotd", "listen": "tcp://127.0.0.1:7007"},
                ]
            },
            "f.toml",
        )
    assert str(info.value) == (
        "f.toml: [[service]] #2 (qotd): tcp://127.0.0.1:7007 is already served by "
        "f.toml: [[service]] #1 (echo)"
    )


def test_config_file_options_left_out_come_from_the_command_line() -> None:
    base = ServerConfig(backlog=9, service_options={"x": "y"})
    (entry,) = parse_config({"service": [{"name": "echo"}]}, "f.toml", base)
    assert entry.config.backlog == 9 and dict(entry.config.service_options) == {}
    (entry,) = parse_config({"service": [{"name": "echo", "backlog": 3}]}, "f.toml", base)
    assert entry.config.backlog == 3
    (entry,) = parse_config({"service": [{"name": "echo"}]})
    assert entry.where == "<config>: [[service]] #1 (echo)"


def test_config_file_read_errors(tmp_path: Path) -> None:
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigError) as info:
        load_config_file(str(missing))
    assert str(info.value) == f"{missing}: cannot read config file: No such file or directory"
    bad = tmp_path / "bad.toml"
    bad.write_text("[[service]\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: not valid TOML: "):
        load_config_file(str(bad))
    good = tmp_path / "good.toml"
    good.write_text('[[service]]\nname = "echo"\nbacklog = 4\n')
    (entry,) = load_config_file(str(good), ServerConfig(max_conns=2))
    assert entry.config.backlog == 4 and entry.config.max_conns == 2


def test_length_empty_frame_waiting_is_not_overwritten_by_the_next_prefix() -> None:
    c = LengthCodec()
    c.feed(_frame(b""))
    c.feed(_frame(b"ab"))
    assert [c.next_message(), c.next_message(), c.next_message()] == [b"", b"ab", None]


class _Largest(bytes):
    """A reply as long as a 4-byte prefix can say (none is allocated)."""

    def __len__(self) -> int:
        return MAX_FRAME


def test_length_encode_takes_the_largest_expressible_length() -> None:
    assert LengthCodec().encode(_Largest(b"x")).startswith(b"\xff\xff\xff\xff")


def test_line_codec_after_end_of_input_starts_afresh() -> None:
    c = LineCodec()
    c.feed(b"last")
    assert c.end_of_input() == b"last"
    c.feed(b"\n")
    assert c.next_message() == b""


# -- ServerConfig validation ----------------------------------------------------------------

from sockserve.config import parse_mode, parse_network, parse_size  # noqa: E402


def _config(name: str, value: Any) -> ServerConfig:
    """A ServerConfig with one setting given by name, of any type: these tests feed the
    run-time checks what the static types would refuse."""
    return ServerConfig(**{name: value})


def test_server_config_defaults_are_the_documented_ones() -> None:
    c = ServerConfig()
    assert (c.framing, c.max_message, c.idle_timeout, c.max_conns) == ("raw", 65536, 300.0, None)
    assert (c.backlog, c.drain_timeout) == (65535, 10.0)
    assert (c.write_high_water, c.write_low_water) == (256 * 1024, 64 * 1024)
    assert (c.allow, c.deny, c.proxy_from, c.unix_mode) == ((), (), (), None)
    assert (c.tls_cert, c.tls_key, c.tls_client_ca, c.tls_handshake_timeout) == (
        None,
        None,
        None,
        10.0,
    )
    assert (c.max_handshakes, c.udp_min_source_port, c.udp_rate, c.udp_amplify) == (
        256,
        1024,
        None,
        False,
    )
    assert (c.reuse_port, c.engine, c.busy_poll_us) == (False, "auto", 50)
    assert (c.proxy_protocol, c.proxy_header_timeout, c.service_options, c.trace) == (
        False,
        5.0,
        {},
        False,
    )


# (field, refused value, message), and the nearest value that is accepted.
BOUNDS = [
    ("max_message", 0, "max message must be at least 1 byte, got 0", 1),
    ("idle_timeout", 0, "idle timeout must be positive, got 0", 0.001),
    ("max_conns", 0, "max conns must be at least 1, got 0", 1),
    ("max_handshakes", -1, "max handshakes must be >= 0 (0 = no cap), got -1", 0),
    ("backlog", 0, "backlog must be at least 1, got 0", 1),
    ("drain_timeout", -0.5, "drain timeout must be >= 0, got -0.5", 0),
    ("engine", "epoll", "unknown engine 'epoll'; expected auto or asyncio", "asyncio"),
    ("busy_poll_us", -1, "busy poll must be within 0-10000 microseconds, got -1", 0),
    ("busy_poll_us", 10001, "busy poll must be within 0-10000 microseconds, got 10001", 10000),
    ("udp_rate", -1, "UDP rate must be >= 0 (0 = off), got -1", 0),
    ("udp_min_source_port", -1, "UDP minimum source port must be within 0-65535", 0),
    ("udp_min_source_port", 65536, "UDP minimum source port must be within 0-65535", 65535),
    (
        "proxy_header_timeout",
        0,
        "PROXY header timeout must be a positive number of seconds, got 0",
        0.001,
    ),
    (
        "proxy_header_timeout",
        float("inf"),
        "PROXY header timeout must be a positive number of seconds, got inf",
        1e9,
    ),
]


@pytest.mark.parametrize(("name", "bad", "message", "good"), BOUNDS)
def test_server_config_bounds(name: str, bad: object, message: str, good: object) -> None:
    with pytest.raises(ConfigError) as info:
        _config(name, bad)
    assert str(info.value) == message
    assert getattr(_config(name, good), name) == good


def test_server_config_write_marks() -> None:
    msg = "write low-water mark must be positive and <= the high-water mark"
    for high, low in ((10, 0), (10, 11), (10, -1)):
        with pytest.raises(ConfigError) as info:
            ServerConfig(write_high_water=high, write_low_water=low)
        assert str(info.value) == msg
    c = ServerConfig(write_high_water=10, write_low_water=10)
    assert (c.write_high_water, c.write_low_water) == (10, 10)
    assert ServerConfig(write_high_water=10, write_low_water=1).write_low_water == 1


def test_server_config_tls_key_needs_a_cert() -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(tls_key="k.pem")
    assert str(info.value) == "--tls-key given without --tls-cert"
    assert ServerConfig(tls_key="k.pem", tls_cert="c.pem").tls_key == "k.pem"
    assert ServerConfig(tls_cert=Path("c.pem")).tls_cert == "c.pem"  # type: ignore[arg-type]
    c = ServerConfig(tls_cert="c", tls_key=Path("k"), tls_client_ca=Path("ca"))  # type: ignore[arg-type]
    assert (c.tls_key, c.tls_client_ca) == ("k", "ca")
    for name in ("tls_cert", "tls_client_ca"):
        with pytest.raises(ConfigError) as info:
            _config(name, 5)
        assert str(info.value) == f"ServerConfig {name}: expected a file name, got 5"


INTS = ["max_message", "max_conns", "backlog", "write_high_water", "write_low_water"]
INTS += ["unix_mode", "udp_min_source_port", "busy_poll_us"]
FLOATS = ["idle_timeout", "drain_timeout", "tls_handshake_timeout", "udp_rate"]
FLOATS += ["proxy_header_timeout"]


@pytest.mark.parametrize("name", INTS)
def test_server_config_integer_fields_refuse_other_types(name: str) -> None:
    for bad in (True, 2.0, "x" if name not in ("max_message", "unix_mode") else [1]):
        with pytest.raises(ConfigError) as info:
            _config(name, bad)
        assert str(info.value) == f"ServerConfig {name}: expected an integer, got {bad!r}"


@pytest.mark.parametrize("name", FLOATS)
def test_server_config_number_fields_take_ints_and_floats(name: str) -> None:
    assert getattr(_config(name, 2), name) == 2
    assert getattr(_config(name, 2.5), name) == 2.5
    for bad in (True, "2"):
        with pytest.raises(ConfigError) as info:
            _config(name, bad)
        assert str(info.value) == f"ServerConfig {name}: expected a number, got {bad!r}"


def test_server_config_none_means_unset_only_where_documented() -> None:
    c = ServerConfig(idle_timeout=None, max_conns=None, unix_mode=None, udp_rate=None)
    assert (c.idle_timeout, c.max_conns, c.unix_mode, c.udp_rate) == (None, None, None, None)
    for name in ("max_message", "backlog", "drain_timeout", "busy_poll_us"):
        with pytest.raises(ConfigError, match=rf"^ServerConfig {name}: expected "):
            _config(name, None)
    with pytest.raises(ConfigError) as info:
        ServerConfig(framing=3)  # type: ignore[arg-type]
    assert str(info.value) == "ServerConfig framing: expected raw, line or length, got 3"
    with pytest.raises(ConfigError, match=r"^unknown framing 'xml'"):
        ServerConfig(framing="xml")


def test_server_config_converts_strings_like_the_cli() -> None:
    c = ServerConfig(
        allow="10.0.0.0/8",  # type: ignore[arg-type]
        deny=["10.1.0.0/16", ipaddress.ip_network("::1/128")],  # type: ignore[arg-type]
        proxy_from=ipaddress.ip_network("127.0.0.1/32"),  # type: ignore[arg-type]
        unix_mode="0660",  # type: ignore[arg-type]
        max_message="64K",  # type: ignore[arg-type]
    )
    assert c.allow == _nets("10.0.0.0/8") and type(c.allow) is tuple
    assert c.deny == _nets("10.1.0.0/16", "::1/128") and c.proxy_from == _nets("127.0.0.1/32")
    assert c.unix_mode == 0o660 and c.max_message == 65536
    assert ServerConfig(allow=("10.0.0.5",)).allow == _nets("10.0.0.5/32")  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        ServerConfig(allow=5)  # type: ignore[arg-type]
    assert str(info.value) == "ServerConfig allow: expected a list of CIDR strings, got int"
    with pytest.raises(ConfigError) as info:
        ServerConfig(deny=["10.0.0.0/8", 7])  # type: ignore[arg-type]
    assert str(info.value) == (
        "ServerConfig deny: expected CIDR strings such as '10.0.0.0/8', got int 7"
    )
    with pytest.raises(ConfigError) as info:
        ServerConfig(proxy_from=["nonsense"])  # type: ignore[arg-type]
    assert str(info.value).startswith("ServerConfig proxy_from: bad network 'nonsense': ")
    with pytest.raises(ConfigError) as info:
        ServerConfig(max_message="lots")  # type: ignore[arg-type]
    assert str(info.value) == (
        "ServerConfig max_message: expected bytes such as 65536 or 64K, not 'lots'"
    )
    with pytest.raises(ConfigError) as info:
        ServerConfig(unix_mode="9")  # type: ignore[arg-type]
    assert str(info.value) == (
        "ServerConfig unix_mode: bad Unix socket mode '9': expected octal such as 660"
    )
    assert ServerConfig().replace(backlog=5).backlog == 5


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("65536", 65536),
        ("64K", 65536),
        ("64k", 65536),
        ("64KiB", 65536),
        ("64kb", 65536),
        (" 2M ", 2 * 1024**2),
        ("1MiB", 1024**2),
        ("1G", 1024**3),
        ("1gib", 1024**3),
        ("7b", 7),
        ("0", 0),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "1.5K", "1T", "-1", "64 K", "x64"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == f"expected bytes such as 65536 or 64K, not {text!r}"


def test_parse_network_and_mode() -> None:
    assert parse_network("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")  # not strict
    assert parse_network("::1") == ipaddress.ip_network("::1/128")
    with pytest.raises(ConfigError, match=r"^bad network '10\.0\.0\.0/33': "):
        parse_network("10.0.0.0/33")
    assert parse_mode("660") == 0o660 and parse_mode("0") == 0 and parse_mode("7777") == 0o7777
    with pytest.raises(ConfigError, match=r"^bad Unix socket mode '10000': out of range$"):
        parse_mode("10000")
    with pytest.raises(ConfigError) as info:
        parse_mode("17777")
    assert str(info.value) == "bad Unix socket mode '17777': out of range"
    with pytest.raises(ConfigError) as info:
        parse_mode("-1")
    assert str(info.value) == "bad Unix socket mode '-1': out of range"
    with pytest.raises(ConfigError) as info:
        parse_mode("rw")
    assert str(info.value) == "bad Unix socket mode 'rw': expected octal such as 660"


def test_access_decision_cache_is_bounded() -> None:
    """A flood of distinct (spoofed UDP) sources must not grow the per-host cache without
    bound: it holds at most 4096 decisions."""
    ac = AccessControl((), _nets("10.0.0.0/8"))
    for i in range(5000):
        assert ac.permits(f"11.0.{i // 256}.{i % 256}")
    assert ac.permits.cache_info().currsize == 4096


# -- PROXY protocol -------------------------------------------------------------------------

from sockserve.framing.proxy import (  # noqa: E402
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderReader,
    encode_v1,
    encode_v2,
    parse_header,
)


def _refuses(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_header(data)
    assert str(info.value) == message


def _v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + len(body).to_bytes(2, "big") + body


def test_proxy_constants() -> None:
    assert V1_MAX == 107 and V2_MAX == 16 + 0xFFFF
    assert V2_SIGNATURE == b"\r\n\r\n\x00\r\nQUIT\n"


def test_proxy_v1_tcp4_and_tcp6_exactly() -> None:
    line = b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\n"
    assert parse_header(line + b"rest") == (
        ProxyHeader(1, "PROXY", "TCP4", ("10.0.0.1", 1234), ("10.0.0.2", 80)),
        len(line),
    )
    line = b"PROXY TCP6 ::1 2001:db8::2 0 65535\r\n"
    header, used = parse_header(line) or (None, 0)
    assert used == len(line)
    assert header == ProxyHeader(1, "PROXY", "TCP6", ("::1", 0), ("2001:db8::2", 65535))
    assert header.relayed and header.client_ip == "::1"
    assert parse_header(b"PROXY UNKNOWN whatever\r\nx") == (ProxyHeader(1, "LOCAL", "UNKNOWN"), 24)
    unknown = parse_header(b"PROXY UNKNOWN\r\n")
    assert unknown is not None and unknown[0].relayed and unknown[0].client_ip is None


def test_proxy_v1_incomplete_is_none_until_the_crlf() -> None:
    line = b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\n"
    for i in range(1, len(line)):
        assert parse_header(line[:i]) is None, line[:i]
    assert parse_header(b"") is None


def test_proxy_v1_length_bound_is_107_bytes() -> None:
    longest = b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(longest) == 104
    assert parse_header(longest) is not None
    pad = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(pad) == V1_MAX
    assert parse_header(pad) == (ProxyHeader(1, "LOCAL", "UNKNOWN"), V1_MAX)
    assert parse_header(pad[:-1]) is None  # 106 bytes and a CR: the LF may follow
    _refuses(pad[:-2] + b"xx", "PROXY v1 header longer than 107 bytes")
    _refuses(pad[:-2] + b"x\r", "PROXY v1 header longer than 107 bytes")  # no room for LF
    assert parse_header(pad[:-2] + b"x") is None  # 106 bytes


def test_proxy_v1_refusals_say_why() -> None:
    _refuses(b"GET / HTTP/1.1\r\n", "no PROXY header: connection starts with b'GET / HT'")
    _refuses(b"PROXX", "no PROXY header: connection starts with b'PROXX'")
    _refuses(b"PROXY TCP4 1\x01", "PROXY v1 header holds a non-printable byte 0x01")
    _refuses(b"PROXY TCP4 1\x7f", "PROXY v1 header holds a non-printable byte 0x7f")
    _refuses(b"PROXY UDP4 a b 1 2\r\n", "PROXY v1 header has unknown protocol 'UDP4'")
    _refuses(b"PROXY\r\n", "no PROXY header: connection starts with b'PROXY\\r\\n'")
    _refuses(b"PROXY \r\n", "PROXY v1 header has unknown protocol ''")
    _refuses(
        b"PROXY " + b"T" * 40 + b"\r\n",
        "PROXY v1 header has unknown protocol 'TTTTTTTTTTTTTTTT'",
    )
    _refuses(
        b"PROXY TCP4 10.0.0.1  10.0.0.2 1 2\r\n",
        "PROXY v1 TCP4 header needs 4 fields separated by single spaces, "
        "got b'PROXY TCP4 10.0.0.1  10.0.0.2 1 2'",
    )
    _refuses(
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1\r\n",
        "PROXY v1 TCP4 header needs 4 fields separated by single spaces, "
        "got b'PROXY TCP4 10.0.0.1 10.0.0.2 1'",
    )
    _refuses(
        b"PROXY TCP4 10.0.0.x 10.0.0.2 1 2\r\n", "PROXY v1 header has a bad address '10.0.0.x'"
    )
    _refuses(
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "PROXY v1 header has a bad address 'fe80::1%eth0'"
    )
    _refuses(b"PROXY TCP4 10.0.0.1 ::1 1 2\r\n", "PROXY v1 header: '::1' is not an IPv4 address")
    _refuses(
        b"PROXY TCP6 ::1 10.0.0.1 1 2\r\n", "PROXY v1 header: '10.0.0.1' is not an IPv6 address"
    )
    _refuses(
        b"PROXY TCP4 " + b"1" * 60 + b" 10.0.0.2 1 2\r\n",
        f"PROXY v1 header has a bad address '{'1' * 48}'",
    )
    for port in (b"01", b"-1", b"1a", b"", b"+1"):
        _refuses(
            b"PROXY TCP4 10.0.0.1 10.0.0.2 " + port + b" 2\r\n",
            f"PROXY v1 header has a bad port {port.decode()!r}",
        )
    _refuses(
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1 123456789\r\n",
        "PROXY v1 header port 123456789 is out of range",
    )
    _refuses(
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1 65536\r\n", "PROXY v1 header port 65536 is out of range"
    )
    _refuses(
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1 \xd9\xa1\r\n",
        "PROXY v1 header holds a non-printable byte 0xd9",
    )
    assert parse_header(b"PROXY TCP4 10.0.0.1 10.0.0.2 0 0\r\n") is not None


def test_proxy_v2_tcp4_tcp6_udp_with_tlvs() -> None:
    body = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + (1234).to_bytes(2, "big") + (80).to_bytes(2, "big")
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00"
    data = _v2(0x21, 0x11, body + tlvs)
    assert parse_header(data + b"after") == (
        ProxyHeader(
            2, "PROXY", "TCP4", ("10.0.0.1", 1234), ("10.0.0.2", 80), ((1, b"h2"), (4, b""))
        ),
        len(data),
    )
    six = ipaddress.IPv6Address("2001:db8::1").packed + ipaddress.IPv6Address("::2").packed
    six += (65535).to_bytes(2, "big") + (1).to_bytes(2, "big")
    for fam, name in ((0x21, "TCP6"), (0x22, "UDP6")):
        header, used = parse_header(_v2(0x21, fam, six)) or (None, 0)
        assert header == ProxyHeader(2, "PROXY", name, ("2001:db8::1", 65535), ("::2", 1))
        assert used == 16 + 36
    header, _ = parse_header(_v2(0x21, 0x12, body)) or (None, 0)
    assert header is not None and header.family == "UDP4" and header.source == ("10.0.0.1", 1234)


def test_proxy_v2_unix_paths_are_escaped() -> None:
    src = b"/run/a\x01\\b" + b"\0" + b"junk"
    dst = b"/x" * 54  # 108 bytes, no NUL: the whole block
    block = src.ljust(108, b"\0") + dst
    for fam, name in ((0x31, "UNIX"), (0x32, "UNIX_DGRAM")):
        header, used = parse_header(_v2(0x21, fam, block)) or (None, 0)
        assert header is not None and used == 16 + 216
        assert header.family == name and header.source == "/run/a\\x01\\x5cb"
        assert header.destination == "/x" * 54 and header.client_ip is None
    header, _ = parse_header(_v2(0x21, 0x31, "/é~ ".encode().ljust(216, b"\0"))) or (None, 0)
    assert header is not None and header.source == "/\\xc3\\xa9~ " and header.destination == ""


def test_proxy_v2_local_and_unspec() -> None:
    for fam, name in ((0x11, "TCP4"), (0x00, "UNSPEC"), (0x99, "UNSPEC"), (0x31, "UNIX")):
        data = _v2(0x20, fam, b"ignored")
        header, used = parse_header(data) or (None, 0)
        assert header == ProxyHeader(2, "LOCAL", name) and used == len(data)
        assert not header.relayed and header.client_ip is None
    header, used = parse_header(_v2(0x21, 0x00, b"\x05\x00\x01z")) or (None, 0)
    assert header == ProxyHeader(2, "PROXY", "UNSPEC", tlvs=((5, b"z"),)) and used == 20
    assert header.relayed


def test_proxy_v2_incomplete_is_none() -> None:
    data = _v2(0x21, 0x11, bytes(12))
    for i in range(1, len(data)):
        assert parse_header(data[:i]) is None
    assert parse_header(data) is not None
    reader = ProxyHeaderReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is None
    assert reader.feed(data[-1:] + b"app") is not None
    assert reader.rest == b"app"
    assert reader.feed(b"more") is reader.header and reader.rest == b"appmore"


def test_proxy_v2_refusals_say_why() -> None:
    _refuses(
        b"\r\n\r\n\x00\r\nQUIX", "no PROXY header: bad v2 signature b'\\r\\n\\r\\n\\x00\\r\\nQUIX'"
    )
    _refuses(b"\rX", "no PROXY header: bad v2 signature b'\\rX'")
    _refuses(_v2(0x11, 0x11, b""), "PROXY v2 header has version 1, expected 2")
    _refuses(_v2(0x31, 0x11, b""), "PROXY v2 header has version 3, expected 2")
    _refuses(_v2(0x22, 0x11, b""), "PROXY v2 header has unknown command 2")
    _refuses(_v2(0x2F, 0x11, b""), "PROXY v2 header has unknown command 15")
    _refuses(_v2(0x21, 0x13, bytes(12)), "PROXY v2 header has unknown address family 0x13")
    _refuses(_v2(0x21, 0x41, bytes(12)), "PROXY v2 header has unknown address family 0x41")
    _refuses(
        _v2(0x21, 0x11, bytes(11)),
        "PROXY v2 TCP4 header length 11 is shorter than its 12-byte addresses",
    )
    _refuses(
        _v2(0x21, 0x21, bytes(35)),
        "PROXY v2 TCP6 header length 35 is shorter than its 36-byte addresses",
    )
    _refuses(
        _v2(0x21, 0x31, bytes(215)),
        "PROXY v2 UNIX header length 215 is shorter than its 216-byte addresses",
    )
    _refuses(
        _v2(0x21, 0x11, bytes(12) + b"\x01\x00"),
        "PROXY v2 header ends inside a TLV's type and length",
    )
    _refuses(
        _v2(0x21, 0x11, bytes(12) + b"\x01"), "PROXY v2 header ends inside a TLV's type and length"
    )
    _refuses(
        _v2(0x21, 0x11, bytes(12) + b"\x02\x00\x03ab"),
        "PROXY v2 TLV 0x02 of 3 bytes overruns the header",
    )
    _refuses(
        _v2(0x21, 0x11, bytes(12) + b"\x01\x00\x00" + b"\xe0\x01\x00" + bytes(200)),
        "PROXY v2 TLV 0xe0 of 256 bytes overruns the header",
    )
    header, _ = parse_header(_v2(0x21, 0x11, bytes(12) + b"\x02\x00\x02ab")) or (None, 0)
    assert header is not None and header.tlvs == ((2, b"ab"),)


def test_proxy_v2_largest_body() -> None:
    body = bytes(12) + b"\x07\xff\xf0" + bytes(0xFFF0)
    data = _v2(0x21, 0x11, body)
    assert len(data) == V2_MAX
    header, used = parse_header(data) or (None, 0)
    assert used == V2_MAX and header is not None and header.tlvs == ((7, bytes(0xFFF0)),)


def test_proxy_encoders() -> None:
    assert encode_v1(None, ("1.2.3.4", 1)) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("1.2.3.4", 1), None) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("1.2.3.4", 5), ("6.7.8.9", 10)) == b"PROXY TCP4 1.2.3.4 6.7.8.9 5 10\r\n"
    assert encode_v1(("::1", 5), ("::2", 10)) == b"PROXY TCP6 ::1 ::2 5 10\r\n"
    assert encode_v2(None, None) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert encode_v2(("1.2.3.4", 1), None, tlvs=((1, b"ab"),)) == (
        V2_SIGNATURE + b"\x20\x00\x00\x05\x01\x00\x02ab"
    )
    assert encode_v2(("1.2.3.4", 258), ("5.6.7.8", 3)) == (
        V2_SIGNATURE + b"\x21\x11\x00\x0c\x01\x02\x03\x04\x05\x06\x07\x08\x01\x02\x00\x03"
    )
    assert encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), stream=False)[13] == 0x12
    six = encode_v2(("::1", 1), ("::2", 2), tlvs=((3, b"x"),))
    assert six[12:16] == b"\x21\x21\x00\x28" and six[-4:] == b"\x03\x00\x01x"
    assert encode_v2(("::1", 1), ("::2", 2), stream=False)[13] == 0x22


# -- the services ----------------------------------------------------------------------------

import struct  # noqa: E402
import time as _time  # noqa: E402

from sockserve.errors import ServiceError  # noqa: E402
from sockserve.services import BUILTINS, DEFAULT_SERVICE, as_service, load_service  # noqa: E402
from sockserve.services import chargen as chargen_mod  # noqa: E402
from sockserve.services import daytime as daytime_mod  # noqa: E402
from sockserve.services import qotd as qotd_mod  # noqa: E402
from sockserve.services import time as time_mod  # noqa: E402
from sockserve.services import timestamp as timestamp_mod  # noqa: E402

PORTS = {"timestamp": 21567, "echo": 7, "discard": 9, "daytime": 13, "qotd": 17}
PORTS |= {"chargen": 19, "time": 37}
RFCS = {"echo": 862, "discard": 863, "chargen": 864, "qotd": 865, "daytime": 867, "time": 868}
LARGER = {"daytime", "qotd", "chargen", "time"}  # the amplification guard's business


@pytest.mark.parametrize("name", sorted(PORTS))
def test_builtin_services_by_name(name: str) -> None:
    info = BUILTINS[name]
    svc = load_service(name)
    assert info.name == svc.name == name and info.module == f"sockserve.services.{name}"
    assert info.port == svc.port == PORTS[name]
    assert svc.replies_larger is (name in LARGER)
    assert svc.description == info.description
    if name in RFCS:
        assert info.description.startswith(f"RFC {RFCS[name]}: ")
    assert (svc.stream is None) is (name == "timestamp")
    assert DEFAULT_SERVICE == "timestamp"


def test_load_service_by_import_string_and_its_errors() -> None:
    svc = load_service("sockserve.services.echo:echo")
    assert svc.handler is not None
    assert svc.name == "sockserve.services.echo:echo" and svc.handler(b"x", None) == b"x"  # type: ignore[arg-type]
    assert load_service("sockserve.services.echo:SERVICE").name == "echo"
    assert load_service("sockserve.services:BUILTINS.get").name == "sockserve.services:BUILTINS.get"
    known = ", ".join(sorted(BUILTINS))
    for spec in ("nope", ":x", "mod:", "mod"):
        with pytest.raises(ServiceError) as info:
            load_service(spec)
        assert str(info.value) == (
            f"unknown service {spec!r}: not a built-in ({known}) and not a module:function string"
        )
    with pytest.raises(
        ServiceError, match=r"^cannot import module 'no_such_mod' for service 'no_such_mod:f': "
    ):
        load_service("no_such_mod:f")
    with pytest.raises(ServiceError) as info:
        load_service("sockserve.services.echo:nope.x")
    assert str(info.value) == "module 'sockserve.services.echo' has no attribute 'nope.x'"
    with pytest.raises(ServiceError) as info:
        load_service("sockserve.services.chargen:LINE_WIDTH")
    assert str(info.value) == (
        "'sockserve.services.chargen:LINE_WIDTH' is int, not a callable handler or Service"
    )
    svc = as_service(lambda request, ctx: request, "n")
    assert svc.name == "n" and as_service(svc, "other") is svc


def test_load_service_names_what_a_user_module_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "badmod_i14.py").write_text("raise KeyError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ServiceError) as info:
        load_service("badmod_i14:f")
    assert (
        str(info.value)
        == "importing 'badmod_i14' for service 'badmod_i14:f' raised KeyError: 'boom'"
    )


def test_time_counts_from_1900_and_wraps() -> None:
    assert time_mod.EPOCH_1900 == 2208988800
    assert time_mod.time_bytes(0) == struct.pack("!I", 2208988800)
    assert time_mod.time_bytes(1.9) == struct.pack("!I", 2208988801)  # whole seconds
    assert time_mod.time_bytes(2**32 - 2208988800) == b"\x00\x00\x00\x00"  # 2036-02-07
    assert time_mod.time_bytes(2**32 - 2208988800 + 5) == b"\x00\x00\x00\x05"
    now = struct.unpack("!I", time_mod.time_handler(b"", None))[0]  # type: ignore[arg-type]
    assert abs(now - (int(_time.time()) + 2208988800) % 2**32) <= 2


def test_timestamp_prefix_is_the_ctime_of_this_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000_000.2]
    monkeypatch.setattr(timestamp_mod, "time", lambda: clock[0])
    monkeypatch.setattr(timestamp_mod, "_second", -1)
    reply = timestamp_mod.timestamp(b"hi", None)  # type: ignore[arg-type]
    assert reply == b"[" + _time.ctime(1_000_000_000).encode() + b"] hi"
    clock[0] = 1_000_000_000.9  # same second: same prefix
    assert timestamp_mod.timestamp(b"", None) == reply[:-2]  # type: ignore[arg-type]
    clock[0] = 1_000_000_001.0  # next second: a new prefix
    assert timestamp_mod.timestamp(b"x", None) == (  # type: ignore[arg-type]
        b"[" + _time.ctime(1_000_000_001).encode() + b"] x"
    )
    assert len(timestamp_mod.timestamp(b"a" * 64, None)) == 91  # type: ignore[arg-type]


def test_daytime_is_ctime_and_crlf() -> None:
    line = daytime_mod.daytime(b"ignored", None)  # type: ignore[arg-type]
    assert len(line) == 26 and line.endswith(b"\r\n")
    assert abs(_time.mktime(_time.strptime(line[:-2].decode())) - _time.time()) <= 2
    assert daytime_mod.daytime_line()[:-2].decode().isascii()


def test_chargen_pattern_at_any_offset() -> None:
    ring = bytes(range(0x20, 0x7F))
    assert ring == chargen_mod.RING and chargen_mod.LINE_WIDTH == 72 and chargen_mod.LINE_LEN == 74
    assert len(chargen_mod.PERIOD) == 7030 and chargen_mod.UDP_MAX == 512
    lines = chargen_mod.PERIOD.split(b"\r\n")
    assert lines[0] == ring[:72] and lines[1] == ring[1:73] and lines[94] == ring[94:] + ring[:71]
    whole = chargen_mod.PERIOD * 40
    for offset, length in ((0, 0), (0, 74), (7029, 10), (7030 * 3 + 5, 100), (123, 200_000)):
        assert chargen_mod.pattern(offset, length) == whole[offset % 7030 :][:length]
    tape = len(chargen_mod._TAPE)
    for offset in (tape - 7030 - 1, 7030 * 2 - 1):
        assert (
            chargen_mod.pattern(offset, tape - offset % 7030)
            == whole[offset % 7030 :][: tape - offset % 7030]
        )
        assert chargen_mod.pattern(offset, tape) == whole[offset % 7030 :][:tape]


def test_chargen_datagrams_start_on_successive_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sockserve.services.chargen.random.randint", lambda a, b: b)
    gen = chargen_mod.ChargenDatagram()
    replies = [gen(b"", None) for _ in range(96)]  # type: ignore[arg-type]
    assert all(len(r) == 512 for r in replies)
    for n in (0, 1, 94):
        assert replies[n] == chargen_mod.pattern(n * 74, 512)
    assert replies[95] == replies[0]  # round the ring
    seen: list[tuple[int, int]] = []

    def three(a: int, b: int) -> int:
        seen.append((a, b))
        return 3

    monkeypatch.setattr("sockserve.services.chargen.random.randint", three)
    assert gen(b"", None) == chargen_mod.pattern(74, 3)  # type: ignore[arg-type]
    assert seen == [(0, 512)]


def test_qotd_quotes_are_checked_text() -> None:
    assert qotd_mod.MAX_QUOTE == 511
    assert qotd_mod.encode_quote("a  \nb\n\n") == b"a\r\nb\r\n"
    assert qotd_mod.encode_quote("\nx\n") == b"x\r\n"
    assert qotd_mod.encode_quote("~ ") == b"~\r\n"
    with pytest.raises(ConfigError) as info:
        qotd_mod.encode_quote("ok\nbad\tline", "q.txt: quote at line 3")
    assert str(info.value) == (
        "q.txt: quote at line 3, line 2: '\\t' is not printable ASCII (RFC 865 quotes are text)"
    )
    with pytest.raises(ConfigError, match=r"^quote, line 1: '\\x7f' is not printable"):
        qotd_mod.encode_quote("\x7f")
    assert len(qotd_mod.encode_quote("a" * 509)) == 511
    with pytest.raises(ConfigError) as info:
        qotd_mod.encode_quote("a" * 510)
    assert str(info.value) == "quote is 512 bytes with CRLFs; RFC 865 wants under 512: shorten it"
    for quote in qotd_mod.SERVICE.options["quotes"]:
        assert quote.endswith(b"\r\n") and len(quote) <= 511
    assert len(qotd_mod.SERVICE.options["quotes"]) == len(qotd_mod.BUILTIN_QUOTES)


def test_qotd_quote_files(tmp_path: Path) -> None:
    assert qotd_mod.parse_quotes("a\nb\n\n  \nc\n%\nd\n", "f") == (
        b"a\r\nb\r\n",
        b"c\r\n",
        b"d\r\n",
    )
    with pytest.raises(ConfigError) as info:
        qotd_mod.parse_quotes("\n%\n \n", "f")
    assert str(info.value) == "f: no quotes found (separate them with blank lines)"
    with pytest.raises(ConfigError) as info:
        qotd_mod.parse_quotes("ok\n\nfine\n\nbad\x01\n", "f")
    assert str(info.value) == (
        "f: quote at line 5, line 1: '\\x01' is not printable ASCII (RFC 865 quotes are text)"
    )
    path = tmp_path / "q.txt"
    path.write_bytes(b"one\r\n%\r\ntwo\n")
    svc = qotd_mod.configure({"quotes": str(path)})
    assert svc.options["quotes"] == (b"one\r\n", b"two\r\n") and svc.port == 17
    assert svc.handler is not None
    quote = svc.handler(b"", None)  # type: ignore[arg-type]  # qotd never reads its ctx
    assert quote in (b"one\r\n", b"two\r\n")
    assert qotd_mod.configure({}) is qotd_mod.SERVICE
    with pytest.raises(ConfigError) as info:
        qotd_mod.configure({"quotes": str(path), "b": 1, "a": 2})
    assert str(info.value) == "service qotd has no option a, b (it takes: quotes)"
    path.write_bytes(b"ok\n\xe9\n")
    with pytest.raises(ConfigError) as info:
        qotd_mod.load_quotes(str(path))
    assert str(info.value) == (
        f"quotes file {path}: byte 3 is not ASCII (RFC 865 quotes are ASCII text)"
    )
    with pytest.raises(ConfigError) as info:
        qotd_mod.load_quotes(str(tmp_path / "none"))
    assert str(info.value) == (
        f"cannot read quotes file {tmp_path / 'none'}: No such file or directory"
    )
    path.write_text("\n%\n")
    with pytest.raises(ConfigError) as info:
        qotd_mod.load_quotes(str(path))
    assert str(info.value) == (
        f"quotes file {path}: no quotes found (separate them with blank lines)"
    )


def test_proxy_edges_of_what_is_checked() -> None:
    _refuses(b"PROXYZ123456", "no PROXY header: connection starts with b'PROXYZ12'")
    # Still waiting for the LF, yet every byte before the CR is checked already.
    _refuses(b"PROXY TCP4 \x01\r", "PROXY v1 header holds a non-printable byte 0x01")
    _refuses(b"PROXY TCP4 \x7f\x7f\r", "PROXY v1 header holds a non-printable byte 0x7f")
    assert parse_header(b"PROXY UNKNOWN ~ \x20\r\n") is not None  # '~' and ' ' are printable
    _refuses(
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1 123456789a\r\n",
        "PROXY v1 header has a bad port '12345678'",
    )
    _refuses(
        _v2(0x21, 0x11, bytes(12) + b"\x01\x00\x00" + b"\x01\x00"),
        "PROXY v2 header ends inside a TLV's type and length",
    )
    block = b"/s" * 54 + b"/d\x7f".ljust(108, b"\0")  # a source path without its NUL
    header, _ = parse_header(_v2(0x21, 0x31, block)) or (None, 0)
    assert header is not None
    assert header.source == "/s" * 54 and header.destination == "/d\\x7f"


def test_qotd_configured_service_is_a_whole_qotd(tmp_path: Path) -> None:
    """The service a quotes file makes (built at start, not at import) is the same
    qotd as the built-in one but for its quotes."""
    path = tmp_path / "q.txt"
    path.write_text("one\n")
    svc = qotd_mod.configure({"quotes": str(path)})
    base = qotd_mod.SERVICE
    assert (svc.name, svc.port, svc.replies_larger) == ("qotd", 17, True)
    assert svc.description == base.description == BUILTINS["qotd"].description
    assert svc.configure is not None and svc.configure({}) is base
    assert svc.stream is not None


def test_qotd_quote_text_keeps_its_indent_and_names_its_first_line() -> None:
    assert qotd_mod.encode_quote("  indented\n  twice\n") == b"  indented\r\n  twice\r\n"
    assert qotd_mod.encode_quote("X marks the spot X") == b"X marks the spot X\r\n"
    with pytest.raises(ConfigError) as info:
        qotd_mod.parse_quotes("bad\x01\n", "f")
    assert str(info.value).startswith("f: quote at line 1, line 1: ")


def test_register_builtin_and_a_spec_with_two_colons(monkeypatch: pytest.MonkeyPatch) -> None:
    from sockserve.services import BuiltinInfo, register_builtin

    monkeypatch.setitem(BUILTINS, "echo2", BUILTINS["echo"])  # restored after the test
    info = BuiltinInfo("echo2", "sockserve.services.echo", "another echo", 7)
    register_builtin(info)
    assert BUILTINS["echo2"] is info and load_service("echo2").name == "echo"
    with pytest.raises(ServiceError) as err:
        load_service("sockserve.services.echo:echo:x")
    assert str(err.value) == "module 'sockserve.services.echo' has no attribute 'echo:x'"


def test_chargen_connection_closed_by_the_client_logs_no_error(serve: object) -> None:
    """Mutation: on_close cancelling a pending turn that is not there (an exception on
    every chargen client's goodbye)."""
    import logging
    import socket as socket_

    from faultkit import LogTap
    from support import addr_of

    tap = LogTap()
    logger = logging.getLogger("sockserve")
    logger.addHandler(tap)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        st = serve("chargen", "tcp://127.0.0.1:0")  # type: ignore[operator]
        for _ in range(3):
            with socket_.create_connection(addr_of(st.url("tcp")), timeout=5) as s:
                assert s.recv(74)
        st.stop()
    finally:
        logger.removeHandler(tap)
        logger.setLevel(old)
    assert tap.errors() == [] and not any("raised" in m for m in tap.messages())


# -- the UDP guards (_engine/guards.py) ----------------------------------------------------

from sockserve._engine import guards as udpguard  # noqa: E402
from sockserve._engine.guards import TokenBuckets, UdpGuard  # noqa: E402

EPH = (32768, 60999)


def _guard(
    host: str = "192.0.2.1", *, inet: bool = True, larger: bool = True, **cfg: object
) -> UdpGuard:
    return UdpGuard(ServerConfig(**cfg), inet=inet, host=host, replies_larger=larger)  # type: ignore[arg-type]


def test_udpguard_constants() -> None:
    assert {7, 9, 13, 17, 19, 37} == udpguard.CLASSIC_SERVICE_PORTS
    assert (udpguard.LOOP_RATE, udpguard.LOOP_BURST, udpguard.MAX_BUCKETS) == (100.0, 100.0, 65536)


def test_udpguard_source_port_floor() -> None:
    g = _guard()
    assert g.min_port == 1024
    assert g.admit("10.0.0.1", 1023, 0.0, EPH) == udpguard.PRIVILEGED
    assert g.admit("10.0.0.1", 0, 0.0, EPH) == udpguard.PRIVILEGED
    assert g.admit("10.0.0.1", 1024, 0.0, EPH) is None
    low = _guard(udp_min_source_port=0)
    assert low.min_port == 1  # port 0 can never get a reply
    assert low.admit("10.0.0.1", 0, 0.0, EPH) == udpguard.PRIVILEGED
    assert low.admit("10.0.0.1", 1, 0.0, EPH) is None
    assert _guard(udp_min_source_port=2000).admit("10.0.0.1", 1999, 0.0, EPH) == "privileged port"
    assert _guard(inet=False).min_port == 0


def test_udpguard_service_ports_are_dropped() -> None:
    g = _guard(udp_min_source_port=0)
    for port in (7, 9, 13, 17, 19, 37):
        assert g.admit("10.0.0.1", port, 0.0, EPH) == udpguard.SERVICE_PORT
    assert g.admit("10.0.0.1", 8, 0.0, EPH) is None
    g.serving([5000, 6000])
    assert g.admit("10.0.0.1", 5000, 0.0, EPH) == "a service's port"
    assert g.admit("10.0.0.1", 7, 0.0, EPH) == udpguard.SERVICE_PORT  # still the classics
    assert g.admit("10.0.0.1", 5001, 0.0, EPH) is None


def test_udpguard_access_rules() -> None:
    g = _guard(deny=("10.1.0.0/16",), udp_rate=0)
    assert g.admit("10.1.2.3", 40000, 0.0, EPH) == udpguard.DENIED
    assert g.admit("::ffff:10.1.2.3", 40000, 0.0, EPH) == "denied"
    assert g.admit("10.2.0.1", 40000, 0.0, EPH) is None
    assert _guard(allow=("10.0.0.0/8",)).admit("11.0.0.1", 40000, 0.0, EPH) == udpguard.DENIED


def test_udpguard_rate_default_by_bind_address() -> None:
    assert _guard("192.0.2.1").rate == 100.0  # DEFAULT_UDP_RATE off loopback
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        assert _guard(host).rate == 0.0
    assert _guard("0.0.0.0").rate == 100.0 and _guard("::").rate == 100.0
    assert _guard("192.0.2.1", inet=False).rate == 0.0
    assert _guard("127.0.0.1", udp_rate=5).rate == 5.0
    assert _guard("192.0.2.1", udp_rate=0).rate == 0.0


def test_udpguard_rate_limit_per_source_host() -> None:
    g = _guard("192.0.2.1", udp_rate=2)
    assert [g.admit("10.0.0.1", 40000 + i, 0.0, EPH) for i in range(3)] == [
        None,
        None,
        udpguard.RATE,
    ]
    assert g.admit("10.0.0.2", 40000, 0.0, EPH) is None  # another host has its own bucket
    assert g.admit("10.0.0.1", 40000, 0.4, EPH) == "over the rate limit"  # 0.8 of a token
    assert g.admit("10.0.0.1", 40000, 0.5, EPH) is None  # 1.0 token at 2/s
    assert g.admit("10.0.0.1", 40000, 0.5, EPH) == udpguard.RATE
    assert g.admit("10.0.0.1", 40000, 100.0, EPH) is None  # refilled, but only to the burst
    assert g.admit("10.0.0.1", 40000, 100.0, EPH) is None
    assert g.admit("10.0.0.1", 40000, 100.0, EPH) == udpguard.RATE
    assert not g.loop_guard


def test_udpguard_loop_budget_for_fixed_source_ports_on_loopback() -> None:
    g = _guard("127.0.0.1")
    assert g.loop_guard and g.rate == 0.0
    assert not _guard("127.0.0.1", udp_rate=0).loop_guard  # an explicit 0: off, budget too
    assert not _guard("127.0.0.1", udp_rate=5).loop_guard
    assert not _guard("127.0.0.1", inet=False).loop_guard
    assert not _guard("192.0.2.1").loop_guard
    for port in (EPH[0], EPH[1], 45000):  # clients' ports: never budgeted
        assert all(g.admit("127.0.0.1", port, 0.0, EPH) is None for _ in range(150))
    fixed = [g.admit("127.0.0.1", 5353, 0.0, EPH) for _ in range(101)]
    assert fixed[:100] == [None] * 100 and fixed[100] == udpguard.LOOP
    assert g.admit("127.0.0.1", 5354, 0.0, EPH) is None  # per (host, port)
    assert g.admit("127.0.0.2", 5353, 0.0, EPH) is None
    assert g.admit("127.0.0.1", 5353, 0.005, EPH) == udpguard.LOOP  # half a token at 100/s
    assert g.admit("127.0.0.1", 5353, 0.01, EPH) is None  # a whole one
    assert g.admit("127.0.0.1", EPH[0] - 1, 0.0, EPH) is None
    assert g.admit("127.0.0.1", EPH[1] + 1, 0.0, EPH) is None


def test_udpguard_amplification_cap() -> None:
    g = _guard()
    assert g.amplify_guard
    assert g.cap(b"abc", b"abcd", ("10.0.0.1", 4000)) == b"abc"  # one byte over: cut
    assert g.cap(b"abc", b"xyz", ("10.0.0.1", 4000)) == b"xyz"  # as large: whole
    assert g.cap(b"", b"abcd", ("10.0.0.1", 4000)) == b""
    assert g.cap(b"a", b"abcd", ("127.0.0.1", 4000)) == b"abcd"  # loopback: whole
    assert g.cap(b"a", b"abcd", ("::1", 4000, 0, 0)) == b"abcd"
    assert g.cap(b"a", b"abcd", "/unix/peer") == b"a"  # not an inet peer: not loopback
    assert not _guard(udp_amplify=True).amplify_guard
    assert not _guard(larger=False).amplify_guard
    assert not _guard(inet=False).amplify_guard
    assert _guard(udp_amplify=True).cap(b"a", b"abcd", ("10.0.0.1", 4000)) == b"abcd"


def test_token_buckets() -> None:
    b = TokenBuckets(10.0, 2.0)
    assert (b.rate, b.burst) == (10.0, 2.0) and len(b) == 0
    assert [b.take("k", 0.0) for _ in range(3)] == [True, True, False]
    assert len(b) == 1
    assert not b.take("k", 0.09)  # 0.9 of a token
    assert b.take("k", 0.1)
    assert TokenBuckets(3.0).burst == 3.0 and TokenBuckets(0.25).burst == 1.0


def test_token_buckets_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udpguard, "MAX_BUCKETS", 4)
    b = TokenBuckets(1.0)
    for key in range(4):
        assert b.take(key, 0.0)
    assert len(b) == 4 and not b.take(0, 0.0)
    assert b.take(99, 0.0) and len(b) == 1  # full: cleared, then the new key
    assert b.take(0, 0.0)  # forgotten: a fresh bucket


def test_ephemeral_ports_and_loopback() -> None:
    lo, hi = udpguard.ephemeral_ports()
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        assert (lo, hi) == tuple(int(x) for x in f.read().split())
    assert udpguard.is_loopback_host("127.9.9.9") and not udpguard.is_loopback_host("10.0.0.1")
    assert not udpguard.is_loopback_peer("127.0.0.1") and udpguard.is_loopback_peer(
        ("127.0.0.1", 1)
    )


def test_udpguard_rate_below_one_per_second_is_one_reply_per_period() -> None:
    """``--udp-rate 0.5``: one reply every 2 s (before the fix: a burst of half a token,
    so never a reply)."""
    g = _guard("192.0.2.1", udp_rate=0.5)
    assert g.admit("10.0.0.1", 40000, 0.0, EPH) is None
    assert g.admit("10.0.0.1", 40000, 0.0, EPH) == udpguard.RATE
    assert g.admit("10.0.0.1", 40000, 1.0, EPH) == udpguard.RATE  # half a token
    assert g.admit("10.0.0.1", 40000, 2.0, EPH) is None


def test_empty_chargen_datagram_is_still_sent_on_loopback(
    serve: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply of 0 characters (RFC 864 allows it) is an empty datagram, not none: only a
    reply the amplification guard cuts to nothing is not sent. Mutation (made by the
    udpguard refactor, then fixed): every empty reply of a guarded service dropped."""
    import socket as socket_

    monkeypatch.setattr("sockserve.services.chargen.random.randint", lambda a, b: 0)
    st = serve("chargen", "udp://127.0.0.1:0")  # type: ignore[operator]
    with socket_.socket(socket_.AF_INET, socket_.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"x", st.endpoints[0].address())
        assert s.recv(600) == b""
