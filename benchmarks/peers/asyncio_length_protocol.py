"""Length-prefixed timestamp server as asyncio users write it: a Protocol with a buffer
of 4-byte big-endian length prefixes, each whole frame answered, one write per chunk.

The strongest idiomatic version: no copy while no partial frame is held, the stamp
formatted once per ``data_received``. Runs on the stdlib loop;
``--uvloop`` runs this same code on uvloop.
"""

from __future__ import annotations

import asyncio
import sys
from time import ctime

from _args import serve_streams


class TimestampFrames(asyncio.Protocol):
    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        self.buf = b""

    def data_received(self, data):  # type: ignore[no-untyped-def]
        if self.buf:
            data = self.buf + data
        out = []
        pos, end = 0, len(data)
        stamp = b"[%s] " % ctime().encode()
        while end - pos >= 4:
            size = int.from_bytes(data[pos : pos + 4], "big")
            if end - pos - 4 < size:
                break
            reply = stamp + data[pos + 4 : pos + 4 + size]
            out.append(len(reply).to_bytes(4, "big") + reply)
            pos += 4 + size
        self.buf = data[pos:]
        if out:
            self.transport.write(b"".join(out))


async def main() -> None:
    await serve_streams(TimestampFrames)


if __name__ == "__main__":
    if "--uvloop" in sys.argv:  # the same code on uvloop (the goal's yardstick)
        sys.argv.remove("--uvloop")
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main())
