"""Raw framing: each chunk that arrives is one request, exactly like the textbook server.

There are no boundaries to keep, so netcat and ``recv(1024)`` clients just work;
a chunk larger than the cap is split rather than refused, since raw input has
no message to be "too large".
"""

from __future__ import annotations

from ..errors import LocalProtocolError
from .base import DEFAULT_MAX_MESSAGE


class RawCodec:
    name = "raw"

    __slots__ = ("_queue", "max_message")

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_message < 1:
            raise ValueError("max_message must be positive")
        self.max_message = max_message
        self._queue: list[bytes] = []  # rarely more than one chunk: a list is enough

    def feed(self, data: bytes) -> None:
        if not data:
            return
        cap = self.max_message
        if len(data) <= cap:
            self._queue.append(data)
            return
        for start in range(0, len(data), cap):
            self._queue.append(data[start : start + cap])

    def next_message(self) -> bytes | None:
        return self._queue.pop(0) if self._queue else None

    def end_of_input(self) -> bytes | None:
        return None

    def encode(self, message: bytes) -> bytes:
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"reply must be bytes, not {type(message).__name__}")
        return bytes(message)

    @property
    def buffered(self) -> int:
        return sum(map(len, self._queue))
