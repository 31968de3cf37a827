"""RFC 862 echo: every byte comes back.

Over a stream it is a :class:`StreamSession`, not a request/reply handler, so
no framing or message cap applies: any size, binary safe, and a slow reader
pauses reading (the engine's flow control) instead of buffering. Data sent
before a half-close is echoed, then the connection closes. Over UDP the
datagram is returned as it is (never larger, so no amplification guard).
"""

from __future__ import annotations

from ..service import Context, StreamSession
from . import builtin


class EchoSession(StreamSession):
    def on_data(self, data: bytes) -> None:
        self.conn.write(data)

    def on_eof(self) -> None:
        self.conn.close()  # flushes what is still buffered first


def echo(request: bytes, ctx: Context) -> bytes:
    return request


SERVICE = builtin("echo", handler=echo, stream=EchoSession)
