"""Toxics: the faults a relay injects, in Toxiproxy's names, units and JSON shapes.

A :class:`Toxic` is validated when it is made, so every holder of one (the CLI, the HTTP API,
the pipes) may trust its attributes: every attribute of its type is present (defaults filled
in, as Toxiproxy's JSON shows them), none unknown, none negative. A :class:`ToxicSet` is one
relay's (one proxy's) live toxics; pipes watch it, so a change reaches connections already
open.

Types (attributes; times in ms unless said, as Toxiproxy):

- stream and datagram: ``latency`` (latency, jitter), ``bandwidth`` (rate KB/s, 0 = no limit);
- stream only: ``slow_close`` (delay), ``timeout`` (timeout, 0 = hold forever), ``reset_peer``
  (timeout), ``slicer`` (average_size, size_variation bytes, delay µs), ``limit_data`` (bytes);
- datagram only (beyond Toxiproxy): ``drop``, ``duplicate`` (probability per datagram) and
  ``reorder`` (probability a datagram waits for the next one, at most delay ms; 0 = no limit).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError, SockserveError

Direction = Literal["upstream", "downstream"]
Transport = Literal["stream", "datagram"]
DIRECTIONS: tuple[Direction, ...] = ("upstream", "downstream")

log = logging.getLogger("sockserve.relay")


class ToxicError(ConfigError):
    """A toxic that cannot be: bad type, stream, toxicity or attribute (the API's 400).

    ``field`` names what is wrong (``"type"``, ``"stream"``, ``"toxicity"``, ``"name"``,
    ``"attributes.jitter"``...)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class _NamedKeyError(SockserveError, KeyError):
    """A KeyError whose str() is its message (a plain KeyError shows its repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DuplicateToxic(_NamedKeyError):
    """A toxic of that name is already in the set (the API's 409)."""


class ToxicNotFound(_NamedKeyError):
    """No toxic of that name in the set (the API's 404)."""


@dataclass(frozen=True)
class _Kind:
    transports: tuple[Transport, ...]
    #: attribute -> default; an int default means a non-negative integer attribute,
    #: a float default a probability in [0, 1].
    attributes: dict[str, int | float]
    #: what ``TYPE=VALUE`` sets on the command line
    main: str


_BOTH: tuple[Transport, ...] = ("stream", "datagram")
KINDS: dict[str, _Kind] = {
    "latency": _Kind(_BOTH, {"latency": 0, "jitter": 0}, "latency"),
    "bandwidth": _Kind(_BOTH, {"rate": 0}, "rate"),
    "slow_close": _Kind(("stream",), {"delay": 0}, "delay"),
    "timeout": _Kind(("stream",), {"timeout": 0}, "timeout"),
    "reset_peer": _Kind(("stream",), {"timeout": 0}, "timeout"),
    "slicer": _Kind(
        ("stream",), {"average_size": 0, "size_variation": 0, "delay": 0}, "average_size"
    ),
    "limit_data": _Kind(("stream",), {"bytes": 0}, "bytes"),
    "drop": _Kind(("datagram",), {"probability": 1.0}, "probability"),
    "duplicate": _Kind(("datagram",), {"probability": 1.0}, "probability"),
    "reorder": _Kind(("datagram",), {"probability": 1.0, "delay": 100}, "probability"),
}
_TOXIC_KEYS = ("name", "type", "stream", "toxicity", "attributes")


def _number(value: object, what: str, field: str, *, integer: bool) -> int | float:
    """``value`` as a finite non-negative number (an integer where ``integer``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ToxicError(f"{what} must be a number, not {value!r}", field)
    if value < 0:
        raise ToxicError(f"{what} must not be negative, not {value!r}", field)
    if integer:
        if value != int(value):
            raise ToxicError(f"{what} must be a whole number, not {value!r}", field)
        return int(value)
    return float(value)


def _probability(value: object, what: str, field: str) -> float:
    p = _number(value, what, field, integer=False)
    if p > 1:
        raise ToxicError(f"{what} must be between 0 and 1, not {value!r}", field)
    return p


def _kind(type: object) -> _Kind:
    kind = KINDS.get(type) if isinstance(type, str) else None
    if kind is None:
        known = ", ".join(sorted(KINDS))
        raise ToxicError(f"invalid toxic type {type!r} (known: {known})", "type")
    return kind


@dataclass
class Toxic:
    """One fault on one direction of a relay, valid once made (raises :class:`ToxicError`).

    ``toxicity`` is the probability it applies to a connection (to a datagram flow), drawn
    once per connection as Toxiproxy does (again when the toxic is updated)."""

    type: str
    name: str = ""
    stream: Direction = "downstream"
    toxicity: float = 1.0
    attributes: dict[str, float | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        kind = _kind(self.type)
        stream = self.stream.lower() if isinstance(self.stream, str) else self.stream
        if stream not in DIRECTIONS:
            raise ToxicError(
                f"stream was invalid, can be either upstream or downstream, not {self.stream!r}",
                "stream",
            )
        self.stream = stream
        if not isinstance(self.name, str):
            raise ToxicError(f"name must be a string, not {self.name!r}", "name")
        self.name = self.name or f"{self.type}_{self.stream}"
        self.toxicity = _probability(self.toxicity, "toxicity", "toxicity")
        if not isinstance(self.attributes, Mapping):
            raise ToxicError(f"attributes must be an object, not {self.attributes!r}", "attributes")
        unknown = sorted(set(self.attributes) - set(kind.attributes), key=str)
        if unknown:
            known = ", ".join(kind.attributes)
            raise ToxicError(
                f"toxic {self.type} has no attribute {unknown[0]!r} (it has: {known})",
                f"attributes.{unknown[0]}",
            )
        attrs: dict[str, float | int] = {}
        for key, default in kind.attributes.items():
            value = self.attributes.get(key, default)
            what, where = f"{self.type} attribute {key}", f"attributes.{key}"
            if isinstance(default, float):
                attrs[key] = _probability(value, what, where)
            else:
                attrs[key] = _number(value, what, where, integer=True)
        if self.type == "slicer" and attrs["average_size"] < 1:
            raise ToxicError(
                "slicer attribute average_size must be at least 1 byte", "attributes.average_size"
            )
        self.attributes = attrs

    @property
    def transports(self) -> tuple[Transport, ...]:
        """The relays it applies to: ``("stream",)``, ``("datagram",)`` or both."""
        return KINDS[self.type].transports

    def to_json(self) -> dict[str, Any]:
        """Toxiproxy's JSON for a toxic, every attribute present."""
        return {
            "attributes": dict(self.attributes),
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": self.toxicity,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Toxic:
        """A toxic from Toxiproxy's JSON body (``POST /proxies/{name}/toxics``).

        As Toxiproxy: ``stream`` defaults to downstream, ``toxicity`` to 1, ``name`` to
        ``TYPE_STREAM``, missing attributes to their defaults, other keys are ignored; unlike
        it, an unknown attribute or a bad value is an error rather than silently zero."""
        if not isinstance(body, Mapping):
            raise ToxicError(f"a toxic must be a JSON object, not {type(body).__name__}", "")
        if "type" not in body:
            raise ToxicError("invalid toxic type: the field 'type' is missing", "type")
        attributes = body.get("attributes")
        return cls(
            type=body["type"],
            name=body.get("name") or "",
            stream=body.get("stream") or "downstream",
            toxicity=1.0 if body.get("toxicity") is None else body["toxicity"],
            attributes={} if attributes is None else attributes,
        )

    def updated(self, body: Mapping[str, Any]) -> Toxic:
        """A copy changed by an update body (``POST /proxies/{name}/toxics/{toxic}``): as
        Toxiproxy, only ``attributes`` (merged into the current ones) and ``toxicity``."""
        if not isinstance(body, Mapping):
            raise ToxicError(f"a toxic must be a JSON object, not {type(body).__name__}", "")
        attributes = body.get("attributes")
        if attributes is not None and not isinstance(attributes, Mapping):
            raise ToxicError(f"attributes must be an object, not {attributes!r}", "attributes")
        return Toxic(
            type=self.type,
            name=self.name,
            stream=self.stream,
            toxicity=self.toxicity if body.get("toxicity") is None else body["toxicity"],
            attributes={**self.attributes, **(attributes or {})},
        )


def _scalar(text: str, key: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ToxicError(f"{key} must be a number, not {text!r}", key) from None


def parse_toxic(text: str, stream: Direction = "downstream") -> Toxic:
    """A toxic from the command line: ``TYPE[=VALUE][,KEY=VALUE...]``.

    ``VALUE`` sets the type's main attribute (``latency=100,jitter=10``, ``bandwidth=64``,
    ``drop=0.5``, ``slicer=100,delay=50``); keys are attributes or ``name``, ``stream``,
    ``toxicity``."""
    items = [item.strip() for item in text.split(",")]
    type_, has_value, value = items[0].partition("=")
    type_ = type_.strip()
    kind = _kind(type_)
    fields: dict[str, Any] = {"type": type_, "stream": stream}
    attributes: dict[str, int | float] = {}
    if has_value:
        attributes[kind.main] = _scalar(value.strip(), kind.main)
    seen = {kind.main} if has_value else set()
    for item in items[1:]:
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ToxicError(f"expected KEY=VALUE after the toxic type, not {item!r}", key)
        if key in seen:
            raise ToxicError(f"{key} is given twice in {text!r}", key)
        seen.add(key)
        if key in ("name", "stream"):
            fields[key] = value
        elif key == "toxicity":
            fields[key] = _scalar(value, key)
        elif key in kind.attributes:
            attributes[key] = _scalar(value, key)
        else:
            known = ", ".join([*kind.attributes, "name", "stream", "toxicity"])
            raise ToxicError(f"toxic {type_} has no attribute {key!r} (it has: {known})", key)
    return Toxic(attributes=attributes, **fields)


class ToxicSet:
    """One relay's live toxics, by unique name; thread-safe (the API or a test thread changes
    it while the relay's loop reads it). Watchers are called after each change, in the
    changing thread (pipes hop to their own loop)."""

    def __init__(self, toxics: Iterable[Toxic] = (), *, transport: Transport | None = None):
        self._lock = threading.RLock()
        self._toxics: dict[str, Toxic] = {}
        self._watchers: list[Callable[[], None]] = []
        self.transport: Transport | None = None
        for toxic in toxics:
            self.add(toxic)
        if transport is not None:
            self.restrict(transport)

    def restrict(self, transport: Transport) -> None:
        """From now on accept only toxics for ``transport``; raises if one held is not."""
        with self._lock:
            for toxic in self._toxics.values():
                self._check(toxic, transport)
            self.transport = transport

    @staticmethod
    def _check(toxic: Toxic, transport: Transport | None) -> None:
        if transport is not None and transport not in toxic.transports:
            other = "datagram (udp, unixgram)" if transport == "stream" else "stream"
            raise ToxicError(
                f"toxic {toxic.name!r}: {toxic.type} applies only to {other} relays, "
                f"not to a {transport} relay",
                "type",
            )

    def _changed(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for callback in watchers:
            try:
                callback()
            except Exception:  # one broken watcher must not stop the others nor the caller
                log.exception("a toxics watcher failed")

    def add(self, toxic: Toxic) -> None:
        """Add at the end of its direction's chain; :class:`DuplicateToxic` if the name is taken."""
        with self._lock:
            if toxic.name in self._toxics:
                raise DuplicateToxic(f"toxic already exists: {toxic.name!r}")
            self._check(toxic, self.transport)
            self._toxics[toxic.name] = toxic
        self._changed()

    def update(self, name: str, body: Mapping[str, Any]) -> Toxic:
        """Change a toxic's attributes/toxicity in place in its chain (Toxiproxy's update body)."""
        with self._lock:
            current = self._toxics.get(name)
            if current is None:
                raise ToxicNotFound(f"toxic not found: {name!r}")
            new = current.updated(body)
            self._toxics[name] = new
        self._changed()
        return new

    def remove(self, name: str) -> None:
        """Remove a toxic; what it held flows on. :class:`ToxicNotFound` if absent."""
        with self._lock:
            if self._toxics.pop(name, None) is None:
                raise ToxicNotFound(f"toxic not found: {name!r}")
        self._changed()

    def clear(self) -> None:
        with self._lock:
            had = bool(self._toxics)
            self._toxics.clear()
        if had:
            self._changed()

    def get(self, name: str) -> Toxic | None:
        with self._lock:
            return self._toxics.get(name)

    def chain(self, direction: Direction) -> list[Toxic]:
        """The toxics on one direction, in the order they were added (the order they act)."""
        with self._lock:
            return [t for t in self._toxics.values() if t.stream == direction]

    def __iter__(self) -> Iterator[Toxic]:
        """Upstream toxics first, then downstream, each in the order added (as Toxiproxy lists)."""
        return iter([*self.chain("upstream"), *self.chain("downstream")])

    def __len__(self) -> int:
        with self._lock:
            return len(self._toxics)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._toxics

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after each change; returns the function that stops it."""
        with self._lock:
            self._watchers.append(callback)

        def unwatch() -> None:
            with self._lock:
                if callback in self._watchers:
                    self._watchers.remove(callback)

        return unwatch
