"""An ``async def`` handler served with asyncio streams on uvloop, as their users write it:
``data = await reader.read(65536)`` then ``writer.write(await handler(data))``; over UDP
a ``DatagramProtocol`` that runs each request's handler in a task.

The handler (:func:`async_handlers.timestamp`) is the one ``sockserve serve
async_handlers:timestamp`` runs, so the two servers differ only in how they call it.
"""

from __future__ import annotations

import asyncio

import uvloop
from _args import parse
from async_handlers import timestamp


async def serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(await timestamp(data, None))
    except ConnectionError:
        pass
    finally:
        writer.close()


class TimestampUDP(asyncio.DatagramProtocol):
    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        self.tasks: set[asyncio.Task[None]] = set()

    def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
        task = asyncio.get_running_loop().create_task(self.answer(data, addr))
        self.tasks.add(task)  # keep a reference until it is done (asyncio's advice)
        task.add_done_callback(self.tasks.discard)

    async def answer(self, data: bytes, addr: object) -> None:
        self.transport.sendto(await timestamp(data, None), addr)


async def main() -> None:
    args = parse()
    loop = asyncio.get_running_loop()
    if args.tcp:
        await asyncio.start_server(serve_client, "127.0.0.1", args.tcp)
    if args.unix:
        await asyncio.start_unix_server(serve_client, args.unix)
    if args.udp:
        await loop.create_datagram_endpoint(TimestampUDP, local_addr=("127.0.0.1", args.udp))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main())
