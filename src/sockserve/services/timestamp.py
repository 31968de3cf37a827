"""The timestamp service: every message comes back as ``[<ctime>] <message>``.

The classic teaching example (port 21567). ``time.ctime()`` is 24 characters,
so a 64-byte request gets a 91-byte reply.

``ctime`` has one-second resolution, so the ``[<ctime>] `` prefix is formatted
once per second and reused: the reply bytes are exactly what
``b"[%s] %s" % (ctime().encode(), request)`` gives, at a third of the cost
(about 0.2 us instead of 0.7 us a request, measured with timeit).
"""

from __future__ import annotations

from time import ctime, time

from ..service import Context, nonblocking
from . import builtin

#: The second the prefix was formatted for (a float: ``now - _second`` stays a float
#: subtraction), and the prefix (one formatter per process). A subtraction and a chained
#: comparison a call, no ``int()``: that call was a third of the handler's own time.
_second = -1.0
_prefix = b""


def timestamp(request: bytes, ctx: Context) -> bytes:
    global _second, _prefix
    now = time()
    if not 0.0 <= now - _second < 1.0:  # a new second (or the clock was set back)
        second = int(now)
        _prefix = b"[" + ctime(second).encode() + b"] "
        _second = float(second)
    return _prefix + request


# Never moved to the handler threads: it cannot block, and a loaded machine that
# deschedules the server mid-call must not take it off the fast path.
SERVICE = builtin("timestamp", handler=nonblocking(timestamp))
