"""Line-framed timestamp server as asyncio users write it: a Protocol that splits its
buffer on ``b"\\n"`` and answers every whole line in one write.

The strongest idiomatic version: no copy while no partial line is held, the stamp
formatted once per ``data_received``, one ``transport.write`` per chunk. Runs on the
stdlib loop; ``--uvloop`` runs this same code on uvloop. ``--streams``: the other way
asyncio users write it, ``await reader.readline()`` then ``writer.write`` per line.
"""

from __future__ import annotations

import asyncio
import sys
from time import ctime

from _args import parse, serve_streams


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


async def serve_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            if line.endswith(b"\n"):
                stamp = b"[%s] " % ctime().encode()
                writer.write(stamp + line[:-1].rstrip(b"\r") + b"\n")
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main() -> None:
    if "--streams" not in sys.argv:
        await serve_streams(TimestampLines)
        return
    sys.argv.remove("--streams")
    args = parse()
    await asyncio.start_server(serve_lines, "127.0.0.1", args.tcp)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if "--uvloop" in sys.argv:  # the same code on uvloop (the goal's yardstick)
        sys.argv.remove("--uvloop")
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main())
