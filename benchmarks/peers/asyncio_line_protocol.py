"""Line-framed timestamp server as asyncio users write it: a Protocol that splits its
buffer on ``b"\\n"`` and answers every whole line in one write.

The strongest idiomatic version: no copy while no partial line is held, the stamp
formatted once per ``data_received``, one ``transport.write`` per chunk. Runs on the
stdlib loop; ``--uvloop`` runs this same code on uvloop.
"""

from __future__ import annotations

import asyncio
import sys
from time import ctime

from _args import serve_streams


class TimestampLines(asyncio.Protocol):
    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        self.buf = b""

    def data_received(self, data):  # type: ignore[no-untyped-def]
        if self.buf:
            data = self.buf + data
        *lines, self.buf = data.split(b"\n")
        if lines:
            stamp = b"[%s] " % ctime().encode()
            self.transport.write(b"".join([stamp + line.rstrip(b"\r") + b"\n" for line in lines]))


async def main() -> None:
    await serve_streams(TimestampLines)


if __name__ == "__main__":
    if "--uvloop" in sys.argv:  # the same code on uvloop (the goal's yardstick)
        sys.argv.remove("--uvloop")
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main())
