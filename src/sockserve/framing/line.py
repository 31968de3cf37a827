"""Line framing: newline-delimited requests; replies get a newline.

A trailing ``\\r`` is stripped so telnet and CRLF clients work. The search for
the newline resumes where the last one stopped (h11's ReceiveBuffer idea), so a
client trickling one byte at a time costs linear, not quadratic, work: a DoS
defence. A line longer than the cap fails as soon as the buffer passes the cap,
so memory never grows with an attacker's input.
"""

from __future__ import annotations

from ..errors import LocalProtocolError, MessageTooLarge
from .base import DEFAULT_MAX_MESSAGE


class LineCodec:
    name = "line"

    __slots__ = ("_buf", "_scan", "max_message")

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_message < 1:
            raise ValueError("max_message must be positive")
        self.max_message = max_message
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already known to hold no newline

    def feed(self, data: bytes) -> None:
        self._buf += data
        self._check_cap()

    def _check_cap(self) -> None:
        # The line itself may be max_message long, plus "\r\n".
        if self._buf.find(b"\n", self._scan) == -1 and len(self._buf) > self.max_message + 2:
            raise MessageTooLarge(f"line longer than {self.max_message} bytes without a newline")

    def next_message(self) -> bytes | None:
        buf = self._buf
        idx = buf.find(b"\n", self._scan)
        if idx == -1:
            self._scan = len(buf)
            if len(buf) > self.max_message + 2:  # an over-long line behind the last whole one
                raise MessageTooLarge(
                    f"line longer than {self.max_message} bytes without a newline"
                )
            return None
        end = idx - 1 if idx and buf[idx - 1] == 0x0D else idx
        if end > self.max_message:
            raise MessageTooLarge(f"line of {end} bytes exceeds the {self.max_message}-byte cap")
        line = bytes(buf[:end])
        del buf[: idx + 1]
        self._scan = 0
        # No cap check on the rest here: this line is whole and must be handed out; the
        # next call reports an over-long remainder.
        return line

    def end_of_input(self) -> bytes | None:
        buf = self._buf
        if not buf:
            return None
        # The unterminated last line obeys the same rules as the others: one "\r" is
        # stripped, and it may not exceed the cap (feed allows cap + 2 while waiting).
        end = len(buf) - 1 if buf[-1] == 0x0D else len(buf)
        if end > self.max_message:
            raise MessageTooLarge(
                f"last line of {end} bytes exceeds the {self.max_message}-byte cap"
            )
        line = bytes(buf[:end])
        buf.clear()
        self._scan = 0
        return line

    def encode(self, message: bytes) -> bytes:
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"reply must be bytes, not {type(message).__name__}")
        return bytes(message) + b"\n"

    @property
    def buffered(self) -> int:
        return len(self._buf)
