"""The timestamp service: every message comes back as ``[<ctime>] <message>``.

The classic teaching example (port 21567). ``time.ctime()`` is 24 characters,
so a 64-byte request gets a 91-byte reply.
"""

from __future__ import annotations

from time import ctime

from ..service import Context, Service


def timestamp(request: bytes, ctx: Context) -> bytes:
    return b"[%s] %s" % (ctime().encode(), request)


SERVICE = Service(
    name="timestamp",
    handler=timestamp,
    description="replies [<ctime>] <message> to every message (the textbook example)",
    port=21567,
)
