"""The bare uvloop Protocol server: the asyncio Protocol code, on uvloop (the goal's yardstick).

``--tls CERT KEY`` serves the same Protocol over TLS on the ``--tcp`` port instead, as uvloop
users write it: ``create_server(..., ssl=context)`` (uvloop's own TLS transport).
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import uvloop
from asyncio_protocol import Timestamp, main


async def main_tls(cert: str, key: str) -> None:
    from _args import parse

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    args = parse()
    await asyncio.get_running_loop().create_server(Timestamp, "127.0.0.1", args.tcp, ssl=ctx)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if "--tls" in sys.argv:
        at = sys.argv.index("--tls")
        cert, key = sys.argv[at + 1 : at + 3]
        del sys.argv[at : at + 3]
        asyncio.run(main_tls(cert, key))
    else:
        asyncio.run(main())
