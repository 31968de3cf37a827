"""Timestamp server as asyncio users write it: a Protocol whose data_received writes the reply.

Runs on the stdlib event loop; ``uvloop_protocol.py`` runs this same code on uvloop.
"""

from __future__ import annotations

import asyncio
from time import ctime

from _args import parse


class Timestamp(asyncio.Protocol):
    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data):  # type: ignore[no-untyped-def]
        self.transport.write(b"[%s] %s" % (ctime().encode(), data))


class TimestampUDP(asyncio.DatagramProtocol):
    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data, addr):  # type: ignore[no-untyped-def]
        self.transport.sendto(b"[%s] %s" % (ctime().encode(), data), addr)


async def main() -> None:
    args = parse()
    loop = asyncio.get_running_loop()
    if args.tcp:
        await loop.create_server(Timestamp, "127.0.0.1", args.tcp)
    if args.unix:
        await loop.create_unix_server(Timestamp, args.unix)
    if args.udp:
        await loop.create_datagram_endpoint(TimestampUDP, local_addr=("127.0.0.1", args.udp))
    await asyncio.Event().wait()


def run() -> None:
    asyncio.run(main())


if __name__ == "__main__":
    run()
