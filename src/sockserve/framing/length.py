"""Length-prefixed framing: a 4-byte big-endian length, then that many bytes, both ways.

The prefix is checked against the cap before any body is buffered, so a claim
of 4 GiB costs nothing but the four bytes that made it.
"""

from __future__ import annotations

from ..errors import LocalProtocolError, MessageTooLarge, RemoteProtocolError
from .base import DEFAULT_MAX_MESSAGE

PREFIX = 4
MAX_FRAME = 2**32 - 1  # what a 4-byte prefix can express


class LengthCodec:
    name = "length"

    __slots__ = ("_buf", "_need", "max_message")

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_message < 1:
            raise ValueError("max_message must be positive")
        self.max_message = max_message
        self._buf = bytearray()
        self._need = -1  # body length of the frame being read, -1 while reading the prefix

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._read_prefix()

    def _read_prefix(self) -> None:
        if self._need < 0 and len(self._buf) >= PREFIX:
            need = int.from_bytes(self._buf[:PREFIX], "big")
            if need > self.max_message:
                raise MessageTooLarge(
                    f"frame length {need} exceeds the {self.max_message}-byte cap"
                )
            self._need = need
            del self._buf[:PREFIX]

    def next_message(self) -> bytes | None:
        if self._need < 0:
            self._read_prefix()
        need = self._need
        if need < 0 or len(self._buf) < need:
            return None
        body = bytes(self._buf[:need])
        del self._buf[:need]
        # The next prefix is read on the next call, so a bad one behind this whole frame
        # cannot lose it.
        self._need = -1
        return body

    def end_of_input(self) -> bytes | None:
        if self._buf or self._need >= 0:
            have = len(self._buf)
            want = f"{self._need}-byte body" if self._need >= 0 else "4-byte length prefix"
            raise RemoteProtocolError(f"connection closed inside a frame: {have} bytes of a {want}")
        return None

    def encode(self, message: bytes) -> bytes:
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"reply must be bytes, not {type(message).__name__}")
        if len(message) > MAX_FRAME:
            raise LocalProtocolError(f"message of {len(message)} bytes cannot be length-prefixed")
        return len(message).to_bytes(PREFIX, "big") + bytes(message)

    @property
    def buffered(self) -> int:
        return len(self._buf) + (PREFIX if self._need >= 0 else 0)
