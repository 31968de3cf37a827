"""RFC 863 discard: read and drop, never reply.

The connection stays open until the client closes it (or half-closes: nothing
more can arrive, so there is nothing left to do), or the idle timeout passes.
"""

from __future__ import annotations

from ..service import Context, StreamSession
from . import builtin


class DiscardSession(StreamSession):
    def on_data(self, data: bytes) -> None:
        pass


def discard(request: bytes, ctx: Context) -> None:
    return None


SERVICE = builtin("discard", handler=discard, stream=DiscardSession)
