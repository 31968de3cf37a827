"""Endpoint URL parsing: every form, and errors that say what is wrong."""

from __future__ import annotations

import pytest

from sockserve import Endpoint, EndpointError, parse_endpoint


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:21567", Endpoint("tcp", host="127.0.0.1", port=21567)),
        ("udp://localhost:0", Endpoint("udp", host="localhost", port=0)),
        ("tls://example.org:443", Endpoint("tls", host="example.org", port=443)),
        ("tcp://[::1]:8080", Endpoint("tcp", host="::1", port=8080)),
        ("TCP://0.0.0.0:1", Endpoint("tcp", host="0.0.0.0", port=1)),
        ("unix:///tmp/x.sock", Endpoint("unix", path="/tmp/x.sock")),
        ("unixgram:///run/y", Endpoint("unixgram", path="/run/y")),
        ("unix://relative.sock", Endpoint("unix", path="relative.sock")),
        ("unix://@abstract", Endpoint("unix", path="@abstract")),
    ],
)
def test_parse(url: str, expected: Endpoint) -> None:
    assert parse_endpoint(url) == expected


@pytest.mark.parametrize(
    "url",
    ["tcp://127.0.0.1:21567", "udp://[::1]:9", "unix:///tmp/a", "unixgram:///tmp/b", "unix://@n"],
)
def test_round_trip(url: str) -> None:
    assert parse_endpoint(url).url() == url
    assert parse_endpoint(parse_endpoint(url).url()) == parse_endpoint(url)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "empty"),
        ("127.0.0.1:21567", "missing scheme"),
        ("http://x:1", "unknown scheme"),
        ("tcp://127.0.0.1", "missing port"),
        ("tcp://:80", "missing host"),
        ("tcp://host:http", "not a number"),
        ("tcp://host:70000", "out of range"),
        ("tcp://::1:80", "must be bracketed"),
        ("tcp://[::1:80", "unterminated"),
        ("tcp://[::1]x", "unexpected text"),
        ("tcp://host:1/path", "unexpected path"),
        ("unix://", "missing socket path"),
        ("unix:///" + "a" * 200, "longer than"),
        ("unix://@", "empty abstract"),
    ],
)
def test_errors_name_the_problem(url: str, fragment: str) -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint(url)
    assert fragment in str(info.value)


def test_default_port() -> None:
    assert parse_endpoint("tcp://h", default_port=21567).port == 21567


def test_properties() -> None:
    tcp = parse_endpoint("tcp://[::1]:1")
    assert tcp.is_stream and tcp.is_inet and tcp.is_ipv6
    udp = parse_endpoint("unixgram:///x")
    assert not udp.is_stream and udp.is_unix
    assert parse_endpoint("unix://@abs").address() == b"\0abs"
