"""Handlers shared by sockserve and the peers of the handler benchmarks.

``timestamp``: the timestamp reply from an ``async def`` (what an async service that
awaits nothing on most requests costs). ``sometimes_sleeps``: a plain ``def`` that
blocks for one second on requests starting with ``sleep`` (a slow disk, a blocking
driver) and answers the rest at once: the fairness benchmark's handler.
"""

from __future__ import annotations

import time
from time import ctime
from typing import Any


async def timestamp(request: bytes, ctx: Any) -> bytes:
    return b"[%s] %s" % (ctime().encode(), request)


def sometimes_sleeps(request: bytes, ctx: Any) -> bytes:
    if request.startswith(b"sleep"):
        time.sleep(1.0)
    return b"[%s] %s" % (ctime().encode(), request)
