"""RFC 867 daytime: one line with the date, then close (TCP) or one datagram (UDP).

The RFC leaves the format open; we send what BSD inetd sends, ``ctime(3)``
cut to 24 characters plus CRLF (``Fri Nov 27 11:17:02 2026\\r\\n``), local time,
so clients written against inetd parse it.
"""

from __future__ import annotations

import time

from ..service import Context, StreamSession
from . import builtin


def daytime_line() -> bytes:
    return time.ctime().encode("ascii") + b"\r\n"


class DaytimeSession(StreamSession):
    def on_connect(self) -> None:
        self.conn.write(daytime_line())
        self.conn.close()


def daytime(request: bytes, ctx: Context) -> bytes:
    return daytime_line()


SERVICE = builtin(
    "daytime",
    handler=daytime,
    stream=DaytimeSession,
    replies_larger=True,  # 26 bytes for any datagram, even an empty one
)
