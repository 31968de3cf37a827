"""Toxics as data: Toxiproxy's JSON both ways, the command-line form, every bad input an error
that names its field, and a ToxicSet's rules (unique names, order, watchers, transports)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from sockserve.relay.toxics import (
    DuplicateToxic,
    Toxic,
    ToxicError,
    ToxicNotFound,
    ToxicSet,
    parse_toxic,
)


def test_json_is_toxiproxys_with_defaults_filled_in() -> None:
    toxic = Toxic.from_json({"type": "latency", "attributes": {"latency": 100}})
    assert toxic.to_json() == {
        "attributes": {"latency": 100, "jitter": 0},
        "name": "latency_downstream",
        "type": "latency",
        "stream": "downstream",
        "toxicity": 1.0,
    }
    assert list(toxic.to_json()) == ["attributes", "name", "type", "stream", "toxicity"]
    # the JSON round-trips through text unchanged
    assert Toxic.from_json(json.loads(json.dumps(toxic.to_json()))) == toxic


@pytest.mark.parametrize(
    ("type_", "attributes"),
    [
        ("latency", {"latency": 0, "jitter": 0}),
        ("bandwidth", {"rate": 0}),
        ("slow_close", {"delay": 0}),
        ("timeout", {"timeout": 0}),
        ("reset_peer", {"timeout": 0}),
        ("limit_data", {"bytes": 0}),
        ("drop", {"probability": 1.0}),
        ("duplicate", {"probability": 1.0}),
        ("reorder", {"probability": 1.0, "delay": 100}),
    ],
)
def test_every_type_has_its_defaults(type_: str, attributes: dict[str, Any]) -> None:
    assert Toxic(type_).attributes == attributes


def test_name_and_stream_and_toxicity_from_the_body() -> None:
    toxic = Toxic.from_json(
        {"type": "bandwidth", "stream": "UPSTREAM", "toxicity": 0.25, "attributes": {"rate": 64}}
    )
    assert (toxic.name, toxic.stream, toxic.toxicity) == ("bandwidth_upstream", "upstream", 0.25)
    named = Toxic.from_json({"type": "timeout", "name": "stall", "attributes": None, "x": 1})
    assert named.name == "stall" and named.attributes == {"timeout": 0}
    # integral floats are accepted for integer attributes (JavaScript has no integers)
    assert Toxic.from_json({"type": "latency", "attributes": {"latency": 100.0}}).attributes == {
        "latency": 100,
        "jitter": 0,
    }


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"type": "latencyy"}, "type", "invalid toxic type 'latencyy'"),
        ({}, "type", "'type' is missing"),
        ({"type": 3}, "type", "invalid toxic type 3"),
        ({"type": "latency", "stream": "sideways"}, "stream", "upstream or downstream"),
        ({"type": "latency", "toxicity": 1.5}, "toxicity", "between 0 and 1"),
        ({"type": "latency", "toxicity": -0.1}, "toxicity", "negative"),
        ({"type": "latency", "toxicity": "1"}, "toxicity", "a number"),
        ({"type": "latency", "attributes": {"lag": 1}}, "attributes.lag", "no attribute 'lag'"),
        ({"type": "latency", "attributes": {"jitter": -5}}, "attributes.jitter", "negative"),
        ({"type": "latency", "attributes": {"latency": 1.5}}, "attributes.latency", "whole"),
        ({"type": "latency", "attributes": {"latency": True}}, "attributes.latency", "number"),
        ({"type": "bandwidth", "attributes": {"rate": "64"}}, "attributes.rate", "number"),
        ({"type": "drop", "attributes": {"probability": 2}}, "attributes.probability", "0 and 1"),
        ({"type": "slicer"}, "attributes.average_size", "at least 1"),
        ({"type": "latency", "attributes": [1]}, "attributes", "an object"),
        ({"type": "latency", "name": 7}, "name", "a string"),
    ],
)
def test_bad_bodies_name_their_field(body: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ToxicError, match=words) as caught:
        Toxic.from_json(body)
    assert caught.value.field == field


def test_a_body_that_is_not_an_object() -> None:
    with pytest.raises(ToxicError, match="JSON object"):
        Toxic.from_json([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "latency=100,jitter=10",
            {"type": "latency", "attributes": {"latency": 100, "jitter": 10}},
        ),
        ("bandwidth=64", {"type": "bandwidth", "attributes": {"rate": 64}}),
        ("drop=0.5", {"type": "drop", "attributes": {"probability": 0.5}}),
        ("reset_peer", {"type": "reset_peer", "attributes": {"timeout": 0}}),
        (
            "slicer=100, size_variation=10, delay=50",
            {
                "type": "slicer",
                "attributes": {"average_size": 100, "size_variation": 10, "delay": 50},
            },
        ),
        (
            "limit_data=10,toxicity=0.5,name=cap,stream=upstream",
            {
                "type": "limit_data",
                "name": "cap",
                "stream": "upstream",
                "toxicity": 0.5,
                "attributes": {"bytes": 10},
            },
        ),
    ],
)
def test_command_line_form(text: str, expected: dict[str, Any]) -> None:
    want = Toxic.from_json(expected).to_json()
    assert parse_toxic(text).to_json() == want


def test_command_line_stream_argument() -> None:
    assert parse_toxic("latency=5", "upstream").name == "latency_upstream"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("", "type", "invalid toxic type ''"),
        ("lateny=100", "type", "invalid toxic type 'lateny'"),
        ("latency=fast", "latency", "must be a number, not 'fast'"),
        ("latency=100,jitter", "jitter", "KEY=VALUE"),
        ("latency=100,latency=5", "latency", "twice"),
        ("latency=100,rate=5", "rate", "no attribute 'rate'"),
        ("latency=-1", "attributes.latency", "negative"),
        ("latency=1,toxicity=7", "toxicity", "between 0 and 1"),
        ("latency=1,stream=both", "stream", "upstream or downstream"),
    ],
)
def test_bad_command_lines(text: str, field: str, words: str) -> None:
    with pytest.raises(ToxicError, match=words) as caught:
        parse_toxic(text)
    assert caught.value.field == field


def test_set_names_are_unique_across_directions_and_errors_are_key_errors() -> None:
    toxics = ToxicSet([Toxic("latency", name="a", stream="upstream")])
    with pytest.raises(DuplicateToxic, match="toxic already exists: 'a'") as dup:
        toxics.add(Toxic("bandwidth", name="a"))
    assert isinstance(dup.value, KeyError) and not isinstance(dup.value, ValueError)
    for call in (lambda: toxics.remove("b"), lambda: toxics.update("b", {})):
        with pytest.raises(ToxicNotFound, match="toxic not found: 'b'") as missing:
            call()
        assert isinstance(missing.value, KeyError)
    assert len(toxics) == 1 and "a" in toxics and toxics.get("b") is None


def test_set_order_is_toxiproxys_upstream_first() -> None:
    toxics = ToxicSet()
    for name, stream in [("d1", "downstream"), ("u1", "upstream"), ("d2", "downstream")]:
        toxics.add(Toxic("latency", name=name, stream=stream))  # type: ignore[arg-type]
    assert [t.name for t in toxics] == ["u1", "d1", "d2"]
    assert [t.name for t in toxics.chain("downstream")] == ["d1", "d2"]


def test_update_merges_attributes_and_keeps_the_rest() -> None:
    toxics = ToxicSet([Toxic("latency", attributes={"latency": 100, "jitter": 5})])
    new = toxics.update("latency_downstream", {"attributes": {"jitter": 10}, "type": "ignored"})
    assert new.attributes == {"latency": 100, "jitter": 10} and new.toxicity == 1.0
    assert toxics.get("latency_downstream") is new
    new = toxics.update("latency_downstream", {"toxicity": 0.5})
    assert new.attributes == {"latency": 100, "jitter": 10} and new.toxicity == 0.5
    with pytest.raises(ToxicError, match="negative"):
        toxics.update("latency_downstream", {"attributes": {"latency": -1}})
    assert toxics.get("latency_downstream") is new  # a bad update changes nothing


def test_watchers_see_each_change_and_can_stop() -> None:
    toxics = ToxicSet()
    seen: list[int] = []

    def broken() -> None:
        raise RuntimeError("a broken watcher must not stop the others")

    toxics.watch(broken)
    unwatch = toxics.watch(lambda: seen.append(len(toxics)))
    toxics.add(Toxic("latency"))
    toxics.update("latency_downstream", {"attributes": {"latency": 1}})
    toxics.add(Toxic("timeout"))
    toxics.remove("timeout_downstream")
    toxics.clear()
    toxics.clear()  # nothing to clear: no change
    unwatch()
    toxics.add(Toxic("latency"))
    assert seen == [1, 1, 2, 1, 0]


def test_transport_restriction() -> None:
    udp = ToxicSet([Toxic("latency"), Toxic("drop")], transport="datagram")
    with pytest.raises(ToxicError, match="limit_data applies only to stream relays") as bad:
        udp.add(Toxic("limit_data"))
    assert bad.value.field == "type"
    tcp = ToxicSet([Toxic("bandwidth")], transport="stream")
    with pytest.raises(ToxicError, match="datagram"):
        tcp.add(Toxic("duplicate"))
    loose = ToxicSet([Toxic("reorder")])
    with pytest.raises(ToxicError, match="reorder applies only to datagram"):
        loose.restrict("stream")
    assert loose.transport is None


def test_changes_from_many_threads_keep_the_set_whole() -> None:
    toxics = ToxicSet()

    def work(i: int) -> None:
        for j in range(50):
            toxics.add(Toxic("latency", name=f"t{i}-{j}"))
            toxics.update(f"t{i}-{j}", {"attributes": {"latency": j}})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(toxics) == 200 and len(list(toxics)) == 200
