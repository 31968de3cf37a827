"""RFC 864 chargen: the 72-column rotating pattern of the 95 printable ASCII characters.

Line N is 72 characters starting N places further round the ring ``' '..'~'``,
then CRLF, so the stream repeats every 95 lines (7030 bytes) and is precomputed.

TCP streams until the client closes, ignoring what it sends (BSD inetd also
goes on after a half-close). Resource handling: each write is sized to the
engine's ``write_room`` plus one byte, so the buffer never holds more than the
high-water mark plus one byte; the session then waits for ``on_writable``. A
fast reader could keep the buffer empty forever, so one turn writes at most
:data:`TURN_BYTES` and yields to the event loop before the next.

UDP answers each datagram with 0-512 characters of the pattern (random length,
as the RFC says), each reply starting on the next line of the pattern.
"""

from __future__ import annotations

import asyncio
import itertools
import random

from ..service import Context, StreamConnection, StreamSession
from . import builtin

RING = bytes(range(0x20, 0x7F))  # the 95 printable ASCII characters
LINE_WIDTH = 72
LINE_LEN = LINE_WIDTH + 2  # with CRLF
PERIOD = b"".join(
    (RING * 2)[n : n + LINE_WIDTH] + b"\r\n" for n in range(len(RING))
)  # 95 lines, 7030 bytes: the whole stream is this, repeated
#: Largest single write: big enough for throughput, small enough to keep turns short.
CHUNK = 64 * 1024
#: Bytes written in one event-loop turn before yielding to other connections.
TURN_BYTES = 1024 * 1024
#: RFC 864: a UDP reply holds between 0 and 512 characters.
UDP_MAX = 512
# PERIOD repeated so that any CHUNK-long slice starting inside the first period is contiguous.
_TAPE = PERIOD * (CHUNK // len(PERIOD) + 2)


def pattern(offset: int, length: int) -> bytes:
    """``length`` bytes of the stream starting at byte ``offset`` (any size, any offset)."""
    offset %= len(PERIOD)
    if offset + length <= len(_TAPE):
        return _TAPE[offset : offset + length]
    reps = (offset + length) // len(PERIOD) + 1
    return (PERIOD * reps)[offset : offset + length]


class ChargenSession(StreamSession):
    def __init__(self, conn: StreamConnection) -> None:
        super().__init__(conn)
        self.offset = 0  # position in PERIOD
        self.done = False
        self.pending: asyncio.Handle | None = None

    def on_connect(self) -> None:
        self.produce()

    def on_eof(self) -> None:
        pass  # keep streaming: the client may still be reading

    def on_writable(self) -> None:
        if self.pending is None:
            self.produce()

    def on_close(self) -> None:
        self.done = True
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None

    def produce(self) -> None:
        self.pending = None
        conn = self.conn
        written = 0
        while not self.done and not conn.closing and conn.writable:
            if written >= TURN_BYTES:
                self.pending = asyncio.get_running_loop().call_soon(self.produce)
                return
            n = min(CHUNK, conn.write_room + 1)  # +1 passes the mark, so on_writable follows
            conn.write(_TAPE[self.offset : self.offset + n])
            self.offset = (self.offset + n) % len(PERIOD)
            written += n


class ChargenDatagram:
    """Replies start on successive lines, like BSD inetd's, so clients see the rotation."""

    def __init__(self) -> None:
        self._lines = itertools.cycle(range(len(RING)))

    def __call__(self, request: bytes, ctx: Context) -> bytes:
        return pattern(next(self._lines) * LINE_LEN, random.randint(0, UDP_MAX))


SERVICE = builtin(
    "chargen",
    handler=ChargenDatagram(),
    stream=ChargenSession,
    replies_larger=True,  # US-CERT TA14-017A: 358.8x
)
