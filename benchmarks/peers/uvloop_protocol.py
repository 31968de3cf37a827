"""The bare uvloop Protocol server: the asyncio Protocol code, on uvloop (the goal's yardstick)."""

from __future__ import annotations

import asyncio

import uvloop
from asyncio_protocol import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main())
