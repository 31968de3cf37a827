"""Pipes: one direction of a relayed connection (or datagram flow) through its toxics.

A pipe is Toxiproxy's link: a chain of one stage per toxic on its direction, in the order the
toxics were added, each stage acting on what the one before let through, the last writing to
the far side. It runs on the relay's event loop with timers, no task per chunk. Close and
reset travel in the chain like data (as Toxiproxy's closed channels do): ``limit_data``
closes only after the bytes it let through, and a later ``latency`` or ``slow_close`` delays
that close too. The chain follows the :class:`ToxicSet` live: an added toxic joins the end,
an updated one changes in place (its toxicity drawn again, as Toxiproxy), a removed one hands
what it held to the next stage, so nothing is lost and order is kept.

Where this differs from Toxiproxy, on purpose: ``timeout`` holds data rather than dropping
it, so removing the toxic lets the held data flow and the connection go on (Toxiproxy drops
it and closes); its timer restarts with each chunk, as Toxiproxy's does.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from typing import ClassVar, Protocol

from .stages import DATAGRAM_STAGES, STREAM_STAGES, Item, Signal, Stage
from .toxics import Direction, Toxic, ToxicSet

__all__ = ["DatagramPipe", "Signal", "Sink", "StreamPipe"]


class Sink(Protocol):
    """The far side of one direction, given by whoever moves the bytes."""

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def reset(self) -> None: ...


class _Chain:
    """What both pipes share: the stages, following the ToxicSet, and the bytes they hold."""

    stages_by_type: ClassVar[dict[str, type[Stage]]]
    stream: ClassVar[bool]

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        toxics: ToxicSet,
        direction: Direction,
        rng: random.Random | None,
    ) -> None:
        self.loop = loop
        self.toxics = toxics
        self.direction = direction
        self.rng = rng or random.Random()
        #: toxic type -> connections (flows) it applied to; drop/duplicate/reorder: datagrams
        self.applied: dict[str, int] = {}
        self.held = 0  # bytes inside the stages
        self.closed = False
        self.stages: list[Stage] = []
        self.entry: Stage | None = None
        self._unwatch = toxics.watch(self._changed)
        self._sync()

    @property
    def passthrough(self) -> bool:
        """True while no toxic applies: the caller may write straight to the far side."""
        return self.entry is None and not self.closed

    def count(self, type_: str) -> None:
        self.applied[type_] = self.applied.get(type_, 0) + 1

    def forward(self, stage: Stage | None, item: Item) -> None:
        if self.closed:
            return
        if stage is None:
            self.deliver(item)
        elif stage.dead:
            self.discard([item])
        else:
            stage.push(item)

    def deliver(self, item: Item) -> None:
        raise NotImplementedError

    def discard(self, items: list[Item]) -> None:
        self.held -= sum(len(item) for item in items if isinstance(item, bytes))

    def _changed(self) -> None:
        try:
            here = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            here = False
        if here:
            self._sync()
        else:  # a change from another thread: act on the pipe's own loop
            self.loop.call_soon_threadsafe(self._sync)

    def _draw(self, stage: Stage, toxic: Toxic) -> None:
        stage.toxic = toxic
        stage.active = self.rng.random() < toxic.toxicity
        if stage.active:
            if stage.counts_activation:
                self.count(toxic.type)
            stage.activate()

    def _sync(self) -> None:
        """Make the chain match the toxics now in the set (see the module's docstring)."""
        if self.closed:
            return
        old = {s.toxic.name: (i, s) for i, s in enumerate(self.stages)}
        fresh = len(self.stages)  # new stages go after every old one
        new: list[tuple[int, Stage]] = []  # (place in the old chain, stage)
        flushed: list[tuple[int, list[Item]]] = []
        for toxic in self.toxics.chain(self.direction):
            kind = self.stages_by_type.get(toxic.type)
            if kind is None:  # a toxic for the other transport: the set's owner reports it
                continue
            place, stage = old.get(toxic.name, (0, None))
            if stage is None or stage.toxic.type != toxic.type:
                place, stage = fresh + len(new), kind(self, toxic)
                self._draw(stage, toxic)
            else:
                del old[toxic.name]
                if stage.toxic is not toxic and not stage.active:
                    self._draw(stage, toxic)
                elif stage.toxic is not toxic:  # updated: drawn again, as Toxiproxy
                    if self.rng.random() < toxic.toxicity:
                        stage.configure(toxic)
                    else:
                        flushed.append((place, stage.drain()))
                        stage.active, stage.toxic = False, toxic
            new.append((place, stage))
        for place, stage in old.values():
            if stage.active:
                flushed.append((place, stage.drain()))
        self.stages = [s for _, s in new]
        active = [(p, s) for p, s in new if s.active]
        for (_, a), (_, b) in itertools.pairwise(active):
            a.next = b
        if active:
            active[-1][1].next = None
        self.entry = active[0][1] if active else None
        for place, items in sorted(flushed, key=lambda f: -f[0]):
            after = next((s for p, s in active if p > place), None)
            for item in items:
                self.forward(after, item)
        self.relieved()

    def relieved(self) -> None:
        """The held bytes went down (the stream pipe resumes its source here)."""

    def close(self) -> None:
        """The connection ended: cancel timers, drop what is held, stop following the set."""
        if self.closed:
            return
        self.closed = True
        self._unwatch()
        for stage in self.stages:
            stage.cancel()
        self.held = 0
        self.entry = None


class StreamPipe(_Chain):
    """One direction of a stream connection. Above ``high_water`` bytes held it calls
    ``pause()`` (stop reading the source), at ``low_water`` (a quarter) ``resume()``."""

    stages_by_type = STREAM_STAGES
    stream = True

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        toxics: ToxicSet,
        direction: Direction,
        sink: Sink,
        *,
        pause: Callable[[], None],
        resume: Callable[[], None],
        rng: random.Random | None = None,
        high_water: int = 256 * 1024,
        low_water: int | None = None,
    ) -> None:
        self.sink = sink
        self._pause, self._resume = pause, resume
        self.high_water = high_water
        self.low_water = high_water // 4 if low_water is None else low_water
        self.paused = False
        super().__init__(loop, toxics, direction, rng)

    def feed(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if self.entry is None:
            self.sink.write(data)
            return
        self.held += len(data)
        self.entry.push(data)
        if not self.paused and self.held > self.high_water and not self.closed:
            self.paused = True
            self._pause()

    def feed_eof(self) -> None:
        if self.closed:
            return
        if self.entry is None:
            self.sink.write_eof()
        else:
            self.entry.push(Signal.EOF)

    def deliver(self, item: Item) -> None:
        if isinstance(item, bytes):
            self.held -= len(item)
            self.sink.write(item)
            self.relieved()
        elif item is Signal.EOF:
            self.sink.write_eof()
        else:
            self.close()
            self.sink.close() if item is Signal.CLOSE else self.sink.reset()

    def discard(self, items: list[Item]) -> None:
        super().discard(items)
        self.relieved()

    def relieved(self) -> None:
        if self.paused and self.held <= self.low_water and not self.closed:
            self.paused = False
            self._resume()


class DatagramPipe(_Chain):
    """One direction of a datagram flow. Past ``max_held`` bytes waiting, a new datagram is
    dropped (as a full router queue does) and counted in ``overflow``."""

    stages_by_type = DATAGRAM_STAGES
    stream = False

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        toxics: ToxicSet,
        direction: Direction,
        send: Callable[[bytes], None],
        *,
        rng: random.Random | None = None,
        max_held: int = 256 * 1024,
    ) -> None:
        self.send = send
        self.max_held = max_held
        self.overflow = 0
        super().__init__(loop, toxics, direction, rng)

    def feed(self, datagram: bytes) -> None:
        if self.closed:
            return
        if self.entry is None:
            self.send(datagram)
        elif self.held + len(datagram) > self.max_held:
            self.overflow += 1
        else:
            self.held += len(datagram)
            self.entry.push(datagram)

    def deliver(self, item: Item) -> None:
        if isinstance(item, bytes):
            self.held -= len(item)
            self.send(item)
