"""Fuzzing the sans-IO codecs with hypothesis (h11's harness idea).

Whatever bytes a peer sends, in whatever pieces:

- the only exception a codec raises is :class:`RemoteProtocolError` (its subclass
  :class:`MessageTooLarge` for the cap);
- no message handed to a handler, the last one at end of input included, is longer than
  the cap;
- what a codec holds after handing out every whole message is bounded by the cap, not by
  the input (the "memory does not grow with the attacker's input" claim, byte for byte);
- splitting the stream differently never changes the messages or the outcome;
- encoded messages with trailing junk come back exactly.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockserve.errors import RemoteProtocolError
from sockserve.framing import Codec, make_codec
from sockserve.framing.length import PREFIX

FRAMED = ["line", "length"]
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

caps = st.integers(min_value=1, max_value=64)
#: Bytes that matter to the framings, often: newlines, CRs, and length-prefix-ish bytes.
edgy = st.lists(
    st.one_of(
        st.sampled_from([b"\n", b"\r", b"\r\n", b"\x00", b"\xff", b"\x00\x00\x00", b"a"]),
        st.binary(max_size=70),
    ),
    max_size=30,
).map(b"".join)
streams = st.one_of(st.binary(max_size=600), edgy)


def cuts_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def run(codec: Codec, chunks: list[bytes], cap: int) -> tuple[list[bytes], bool]:
    """Feed ``chunks``; return (messages, ended in a protocol error), checking invariants."""
    out: list[bytes] = []
    try:
        for chunk in chunks:
            codec.feed(chunk)
            while (msg := codec.next_message()) is not None:
                assert len(msg) <= cap, f"{len(msg)}-byte message past the {cap}-byte cap"
                out.append(msg)
            assert codec.buffered <= cap + PREFIX, f"holds {codec.buffered} bytes, cap {cap}"
        last = codec.end_of_input()
    except RemoteProtocolError:
        return out, True
    if last is not None:
        assert len(last) <= cap, f"last message of {len(last)} bytes past the {cap}-byte cap"
        out.append(last)
    return out, False


@FUZZ
@given(st.sampled_from(["raw", "line", "length"]), caps, streams, st.lists(st.integers(0, 10**6)))
def test_any_bytes_raise_only_remote_protocol_errors(
    framing: str, cap: int, data: bytes, cuts: list[int]
) -> None:
    run(make_codec(framing, cap), cuts_of(data, cuts), cap)


@FUZZ
@given(st.sampled_from(FRAMED), caps, streams, st.lists(st.integers(0, 10**6)))
def test_splitting_never_changes_the_outcome(
    framing: str, cap: int, data: bytes, cuts: list[int]
) -> None:
    whole = run(make_codec(framing, cap), [data], cap)
    split = run(make_codec(framing, cap), cuts_of(data, cuts), cap)
    one_by_one = run(make_codec(framing, cap), [data[i : i + 1] for i in range(len(data))], cap)
    assert split == whole
    assert one_by_one == whole


@FUZZ
@given(caps, st.binary(max_size=600), st.lists(st.integers(0, 10**6)))
def test_raw_hands_back_every_byte_in_capped_pieces(cap: int, data: bytes, cuts: list[int]) -> None:
    msgs, failed = run(make_codec("raw", cap), cuts_of(data, cuts), cap)
    assert not failed
    assert b"".join(msgs) == data


@st.composite
def messages_for(draw: st.DrawFn, framing: str) -> tuple[int, list[bytes]]:
    cap = draw(caps)
    body = st.binary(max_size=cap)
    if framing == "line":
        body = body.map(lambda b: b.replace(b"\n", b"").rstrip(b"\r"))
    return cap, draw(st.lists(body, max_size=12))


@FUZZ
@given(st.data(), st.sampled_from(FRAMED), st.binary(max_size=100), st.lists(st.integers(0, 10**6)))
def test_round_trip_with_trailing_junk(
    data: st.DataObject, framing: str, junk: bytes, cuts: list[int]
) -> None:
    cap, msgs = data.draw(messages_for(framing))
    enc = make_codec(framing, cap)
    stream = b"".join(enc.encode(m) for m in msgs)
    dec = make_codec(framing, cap)
    got: list[bytes] = []
    try:
        for chunk in cuts_of(stream + junk, cuts):
            dec.feed(chunk)
            while (m := dec.next_message()) is not None:
                got.append(m)
    except RemoteProtocolError:
        pass  # the junk may break the framing, but only after every real message
    assert got[: len(msgs)] == msgs
