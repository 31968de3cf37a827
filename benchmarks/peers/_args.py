"""What the peer servers share: the command line (which endpoints), and running threads.

Every peer takes ``--tcp PORT``, ``--unix PATH`` and ``--udp PORT`` (any
subset) on 127.0.0.1, so the runner drives them all the same way. Peers that
serve each endpoint in a thread of its own start them with :func:`run_threads`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
from collections.abc import Callable, Iterable


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--tcp", type=int)
    p.add_argument("--unix")
    p.add_argument("--udp", type=int)
    args = p.parse_args()
    if args.unix and os.path.exists(args.unix):
        os.unlink(args.unix)
    return args


def run_threads(targets: Iterable[Callable[[], object]]) -> None:
    """Run each target in its own thread; return when all have returned (a server: never)."""
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def serve_streams(factory: Callable[[], asyncio.Protocol]) -> None:
    """Serve the stream endpoints asked for (TCP, Unix) with an asyncio Protocol; forever."""
    args = parse()
    loop = asyncio.get_running_loop()
    if args.tcp:
        await loop.create_server(factory, "127.0.0.1", args.tcp)
    if args.unix:
        await loop.create_unix_server(factory, args.unix)
    await asyncio.Event().wait()
