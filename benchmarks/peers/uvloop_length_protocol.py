"""The length-framed asyncio Protocol peer on uvloop (the goal's yardstick for length framing)."""

from __future__ import annotations

import asyncio

import uvloop
from asyncio_length_protocol import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main())
