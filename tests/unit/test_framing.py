"""Sans-IO codecs fed whole, byte by byte, split at random, and with junk."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockserve.errors import ConfigError, LocalProtocolError, MessageTooLarge, RemoteProtocolError
from sockserve.framing import Codec, LengthCodec, LineCodec, RawCodec, make_codec


def drain(codec: Codec) -> list[bytes]:
    out = []
    while (msg := codec.next_message()) is not None:
        out.append(msg)
    return out


def feed_pieces(codec: Codec, data: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    last = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        codec.feed(data[last:cut])
        out += drain(codec)
        last = cut
    return out


messages = st.lists(
    st.binary(max_size=300).filter(lambda b: b"\n" not in b and b"\r" not in b), max_size=20
)


# -- line -------------------------------------------------------------------------------


def test_line_whole() -> None:
    c = LineCodec()
    c.feed(b"hello\nworld\r\npartial")
    assert drain(c) == [b"hello", b"world"]
    assert c.buffered == len(b"partial")
    assert c.end_of_input() == b"partial"
    assert c.end_of_input() is None


def test_line_byte_by_byte() -> None:
    c = LineCodec()
    got = []
    for b in b"ab\ncd\n\n":
        c.feed(bytes([b]))
        got += drain(c)
    assert got == [b"ab", b"cd", b""]


@given(messages, st.lists(st.integers(0, 10_000), max_size=30))
def test_line_any_split(msgs: list[bytes], cuts: list[int]) -> None:
    data = b"".join(m + b"\n" for m in msgs)
    assert feed_pieces(LineCodec(), data, cuts) == msgs


def test_line_cap_without_newline_fails_early() -> None:
    c = LineCodec(max_message=10)
    c.feed(b"x" * 12)  # 10 + room for CRLF is still fine
    with pytest.raises(MessageTooLarge):
        c.feed(b"x" * 1000)


def test_line_cap_with_newline() -> None:
    c = LineCodec(max_message=4)
    c.feed(b"12345\n")
    with pytest.raises(MessageTooLarge):
        drain(c)
    ok = LineCodec(max_message=4)
    ok.feed(b"1234\r\n")
    assert drain(ok) == [b"1234"]


def test_line_encode() -> None:
    assert LineCodec().encode(b"hi") == b"hi\n"
    with pytest.raises(LocalProtocolError):
        LineCodec().encode("str")  # type: ignore[arg-type]


# -- length -----------------------------------------------------------------------------


def frame(m: bytes) -> bytes:
    return len(m).to_bytes(4, "big") + m


@given(
    st.lists(st.binary(max_size=500), max_size=20), st.lists(st.integers(0, 20_000), max_size=30)
)
def test_length_any_split(msgs: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frame(m) for m in msgs)
    assert feed_pieces(LengthCodec(), data, cuts) == msgs


def test_length_byte_by_byte_and_empty_frames() -> None:
    c = LengthCodec()
    got = []
    for b in frame(b"") + frame(b"abc") + frame(b""):
        c.feed(bytes([b]))
        got += drain(c)
    assert got == [b"", b"abc", b""]


def test_length_huge_prefix_rejected_before_body() -> None:
    c = LengthCodec(max_message=1024)
    with pytest.raises(MessageTooLarge):
        c.feed(b"\xff\xff\xff\xff")  # 4 GiB claimed: refused on the prefix alone


def test_length_truncated_at_eof() -> None:
    c = LengthCodec()
    c.feed(frame(b"abcdef")[:-2])
    assert drain(c) == []
    with pytest.raises(RemoteProtocolError):
        c.end_of_input()
    partial_prefix = LengthCodec()
    partial_prefix.feed(b"\x00\x00")
    with pytest.raises(RemoteProtocolError):
        partial_prefix.end_of_input()


def test_length_encode() -> None:
    assert LengthCodec().encode(b"xy") == b"\x00\x00\x00\x02xy"


# -- raw --------------------------------------------------------------------------------


def test_raw_chunk_is_message() -> None:
    c = RawCodec()
    c.feed(b"hello")
    c.feed(b"")
    c.feed(b"world")
    assert drain(c) == [b"hello", b"world"]
    assert c.end_of_input() is None


def test_raw_splits_oversized_chunks() -> None:
    c = RawCodec(max_message=4)
    c.feed(b"abcdefghij")
    assert drain(c) == [b"abcd", b"efgh", b"ij"]


# -- junk: the only exception is RemoteProtocolError ------------------------------------


@settings(max_examples=300)
@given(st.sampled_from(["raw", "line", "length"]), st.lists(st.binary(max_size=200), max_size=20))
def test_junk_raises_only_protocol_errors(framing: str, chunks: list[bytes]) -> None:
    c = make_codec(framing, 64)
    got: list[bytes] = []
    try:
        for chunk in chunks:
            c.feed(chunk)
            for msg in drain(c):
                assert len(msg) <= 64
                got.append(msg)
        tail = c.end_of_input()
        if tail is not None:
            got.append(tail)
    except RemoteProtocolError as exc:
        assert framing != "raw", "raw framing has no invalid input"
        assert str(exc), "a protocol error must say what was wrong"
        return
    if framing == "raw":  # every byte comes out, in order, in pieces of at most 64
        assert b"".join(got) == b"".join(chunks)
    elif framing == "line":  # nothing is lost but the line ends (a CR before one may go)
        sent = b"".join(chunks).replace(b"\r", b"").replace(b"\n", b"")
        assert b"".join(got).replace(b"\r", b"") == sent


def test_unknown_framing() -> None:
    with pytest.raises(ConfigError, match="unknown framing"):
        make_codec("xml")
