"""RFC 868 time: 4 bytes, big-endian seconds since 1900-01-01 00:00 UTC, then close.

The count is taken modulo 2**32, so it wraps on 2036-02-07 as the RFC's 32-bit
field implies (clients that know the era resolve it). UDP answers any datagram,
including the empty one the RFC's clients send.
"""

from __future__ import annotations

import struct
import time

from ..service import Context, StreamSession
from . import builtin

#: Seconds from 1900-01-01 to 1970-01-01 (70 years, 17 of them leap): RFC 868's offset.
EPOCH_1900 = 2208988800


def time_bytes(now: float | None = None) -> bytes:
    seconds = int(time.time() if now is None else now) + EPOCH_1900
    return struct.pack("!I", seconds % 2**32)


class TimeSession(StreamSession):
    def on_connect(self) -> None:
        self.conn.write(time_bytes())
        self.conn.close()


def time_handler(request: bytes, ctx: Context) -> bytes:
    return time_bytes()


SERVICE = builtin(
    "time",
    handler=time_handler,
    stream=TimeSession,
    replies_larger=True,  # 4 bytes for an empty datagram
)
