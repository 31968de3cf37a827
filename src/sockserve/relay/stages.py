"""Stages: what each toxic does to the items passing one direction of a relay.

A stage holds items (bytes, or a :class:`Signal`) and passes them to the next stage with
``emit``, now or from a timer on the loop; the chain it is in (:mod:`.pipes`) delivers what
leaves the last one. ``drain`` hands back what a stage holds when its toxic goes, so a removed
toxic loses nothing. Algorithms follow Toxiproxy's ``toxics/*.go``.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections import deque
from collections.abc import Callable
from typing import ClassVar, Protocol

from .toxics import Toxic


class Signal(enum.Enum):
    """What travels in a chain besides bytes."""

    EOF = "eof"  # half-close the far side
    CLOSE = "close"  # close the whole connection after what came before
    RESET = "reset"  # abort the whole connection (RST)


Item = bytes | Signal


class Chain(Protocol):
    """What a stage needs of the pipe it is in."""

    loop: asyncio.AbstractEventLoop
    rng: random.Random
    closed: bool
    held: int  # bytes inside the stages

    @property
    def stream(self) -> bool:
        """Bytes of a stream (which may be cut), not datagrams."""

    def forward(self, stage: Stage | None, item: Item) -> None: ...
    def discard(self, items: list[Item]) -> None: ...
    def count(self, type_: str) -> None: ...


class Stage:
    """One toxic's place in a chain; the base passes everything on."""

    counts_activation: ClassVar[bool] = True

    def __init__(self, chain: Chain, toxic: Toxic) -> None:
        self.chain = chain
        self.toxic = toxic
        self.active = False
        self.dead = False  # it sent CLOSE or RESET: what still comes is dropped
        self.next: Stage | None = None
        self.timer: asyncio.TimerHandle | None = None

    def attr(self, name: str) -> int | float:
        return self.toxic.attributes[name]

    def emit(self, item: Item) -> None:
        if isinstance(item, Signal) and item is not Signal.EOF:
            self.dead = True
        self.chain.forward(self.next, item)

    def push(self, item: Item) -> None:
        self.emit(item)

    def activate(self) -> None:
        """The toxic applies from now on (drawn in)."""

    def configure(self, toxic: Toxic) -> None:
        """New attributes while active."""
        self.toxic = toxic

    def drain(self) -> list[Item]:
        """Stop acting; return what is held, in order, for the next stage."""
        self.cancel()
        return []

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def at(self, when: float, callback: Callable[[], None]) -> None:
        self.cancel()
        self.timer = self.chain.loop.call_at(when, callback)


class Timed(Stage):
    """A FIFO whose items each leave at a planned time (latency, bandwidth, slicer, slow_close)."""

    def __init__(self, chain: Chain, toxic: Toxic) -> None:
        super().__init__(chain, toxic)
        self.queue: deque[tuple[float, Item, float]] = deque()  # (due, item, arrival)
        self.clock = 0.0  # when the last planned item leaves: order is kept

    def plan(self, item: Item, arrival: float, now: float) -> list[tuple[float, Item]]:
        raise NotImplementedError

    def push(self, item: Item) -> None:
        now = self.chain.loop.time()
        self._enqueue(item, now, now)

    def _enqueue(self, item: Item, arrival: float, now: float) -> None:
        for due, piece in self.plan(item, arrival, now):
            if not self.queue and due <= now:
                self.emit(piece)
            else:
                self.queue.append((due, piece, arrival))
        if self.queue and self.timer is None:
            self.at(self.queue[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        now = self.chain.loop.time()
        first = True
        while self.queue and (first or self.queue[0][0] <= now) and not self.chain.closed:
            first = False
            self.emit(self.queue.popleft()[1])
        if self.queue and not self.chain.closed:
            self.at(self.queue[0][0], self._release)

    def drain(self) -> list[Item]:
        self.cancel()
        items = [item for _, item, _ in self.queue]
        self.queue.clear()
        self.clock = 0.0
        return items

    def configure(self, toxic: Toxic) -> None:
        held = list(self.queue)
        self.drain()
        self.toxic = toxic
        now = self.chain.loop.time()
        for _, item, arrival in held:
            self._enqueue(item, arrival, now)

    def after(self, due: float) -> float:
        self.clock = max(self.clock, due)
        return self.clock


class Latency(Timed):
    """Each chunk (datagram) leaves latency ± jitter ms after it came, order kept."""

    def plan(self, item: Item, arrival: float, now: float) -> list[tuple[float, Item]]:
        if isinstance(item, Signal):
            return [(self.after(arrival), item)]
        delay, jitter = self.attr("latency"), self.attr("jitter")
        if jitter:
            delay += self.chain.rng.uniform(-jitter, jitter)
        return [(self.after(arrival + max(delay, 0) / 1000), item)]


class Bandwidth(Timed):
    """Bytes leave at ``rate`` KB/s (1000 bytes): each piece when it would have been sent."""

    def plan(self, item: Item, arrival: float, now: float) -> list[tuple[float, Item]]:
        rate = self.attr("rate") * 1000
        if isinstance(item, Signal) or not rate:
            return [(self.after(now), item)]
        # pieces of 20 ms at the rate (a datagram is never cut), so a reader sees it steady
        step = len(item) if not self.chain.stream else max(1, int(rate) // 50)
        plans: list[tuple[float, Item]] = []
        for i in range(0, len(item), step):
            piece = item[i : i + step]
            self.clock = max(self.clock, now) + len(piece) / rate
            plans.append((self.clock, piece))
        return plans


class Slicer(Timed):
    """Chunks cut as Toxiproxy cuts them (halves, ± size_variation, down to average_size),
    ``delay`` µs after each slice."""

    def plan(self, item: Item, arrival: float, now: float) -> list[tuple[float, Item]]:
        if isinstance(item, Signal):
            return [(self.after(now), item)]
        average, variation = int(self.attr("average_size")), int(self.attr("size_variation"))
        gap = self.attr("delay") / 1e6
        plans: list[tuple[float, Item]] = []
        stack = [(0, len(item))]
        while stack:
            start, end = stack.pop()
            if (end - start) - average <= variation:
                due = self.after(now)
                plans.append((due, item[start:end]))
                self.clock = due + gap
                continue
            mid = start + (end - start) // 2
            if variation > 0:
                mid += self.chain.rng.randrange(2 * variation) - variation
            mid = min(max(mid, start + 1), end - 1)
            stack += [(mid, end), (start, mid)]
        return plans


class SlowClose(Timed):
    """Data passes; an EOF, close or reset leaves ``delay`` ms late."""

    def plan(self, item: Item, arrival: float, now: float) -> list[tuple[float, Item]]:
        extra = self.attr("delay") / 1000 if isinstance(item, Signal) else 0.0
        return [(self.after(now + extra), item)]


class Timeout(Stage):
    """Holds everything; ``timeout`` ms after it last got something (or after it began), it
    closes the connection; 0 holds until the toxic goes."""

    def __init__(self, chain: Chain, toxic: Toxic) -> None:
        super().__init__(chain, toxic)
        self.held: list[Item] = []

    def activate(self) -> None:
        if self.attr("timeout"):
            self.at(self.chain.loop.time() + self.attr("timeout") / 1000, self._expire)

    def _expire(self) -> None:
        self.timer = None
        self.chain.discard(self.held)
        self.held = []
        self.emit(Signal.CLOSE)

    def push(self, item: Item) -> None:
        if item is Signal.CLOSE or item is Signal.RESET:
            self.cancel()
            self.chain.discard(self.held)
            self.held = []
            self.emit(item)
            return
        self.held.append(item)
        self.activate()

    def configure(self, toxic: Toxic) -> None:
        self.toxic = toxic
        self.cancel()
        self.activate()

    def drain(self) -> list[Item]:
        self.cancel()
        held, self.held = self.held, []
        return held


class ResetPeer(Stage):
    """``timeout`` ms after the first thing it gets, resets the connection; it lets nothing by."""

    def __init__(self, chain: Chain, toxic: Toxic) -> None:
        super().__init__(chain, toxic)
        self.held: list[Item] = []
        self.started = 0.0

    def push(self, item: Item) -> None:
        self.held.append(item)
        if len(self.held) == 1:
            self.started = self.chain.loop.time()
            self._arm()

    def _arm(self) -> None:
        if self.held:
            self.at(self.started + self.attr("timeout") / 1000, self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.chain.discard(self.held)
        self.held = []
        self.emit(Signal.RESET)

    def configure(self, toxic: Toxic) -> None:
        self.toxic = toxic
        self._arm()

    def drain(self) -> list[Item]:
        self.cancel()
        held, self.held = self.held, []
        return held


class LimitData(Stage):
    """Lets ``bytes`` through (counted from when it began, kept across updates), then closes."""

    def __init__(self, chain: Chain, toxic: Toxic) -> None:
        super().__init__(chain, toxic)
        self.sent = 0

    def push(self, item: Item) -> None:
        if isinstance(item, Signal):
            self.emit(item)
            return
        room = max(int(self.attr("bytes")) - self.sent, 0)
        part = item[:room]
        self.chain.discard([item[room:]])
        if part:
            self.sent += len(part)
            self.emit(part)
        if self.sent >= self.attr("bytes") and not self.chain.closed:
            self.emit(Signal.CLOSE)


class Drop(Stage):
    counts_activation = False

    def push(self, item: Item) -> None:
        if self.chain.rng.random() < self.attr("probability"):
            self.chain.count(self.toxic.type)
            self.chain.discard([item])
        else:
            self.emit(item)


class Duplicate(Stage):
    counts_activation = False

    def push(self, item: Item) -> None:
        self.emit(item)
        if isinstance(item, bytes) and self.chain.rng.random() < self.attr("probability"):
            self.chain.count(self.toxic.type)
            self.chain.held += len(item)
            self.emit(item)


class Reorder(Stage):
    """With ``probability`` a datagram waits and leaves right after the next one (or after
    ``delay`` ms if none comes; 0 = no limit)."""

    counts_activation = False

    def __init__(self, chain: Chain, toxic: Toxic) -> None:
        super().__init__(chain, toxic)
        self.waiting: Item | None = None

    def push(self, item: Item) -> None:
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            self.cancel()
            self.emit(item)
            self.emit(waiting)
        elif self.chain.rng.random() < self.attr("probability"):
            self.chain.count(self.toxic.type)
            self.waiting = item
            if self.attr("delay"):
                self.at(self.chain.loop.time() + self.attr("delay") / 1000, self._give_up)
        else:
            self.emit(item)

    def _give_up(self) -> None:
        self.timer = None
        for item in self.drain():
            self.emit(item)

    def drain(self) -> list[Item]:
        self.cancel()
        waiting, self.waiting = self.waiting, None
        return [] if waiting is None else [waiting]


STREAM_STAGES: dict[str, type[Stage]] = {
    "latency": Latency,
    "bandwidth": Bandwidth,
    "slow_close": SlowClose,
    "timeout": Timeout,
    "reset_peer": ResetPeer,
    "slicer": Slicer,
    "limit_data": LimitData,
}
DATAGRAM_STAGES: dict[str, type[Stage]] = {
    "latency": Latency,
    "bandwidth": Bandwidth,
    "drop": Drop,
    "duplicate": Duplicate,
    "reorder": Reorder,
}
