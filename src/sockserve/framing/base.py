"""The sans-IO codec interface shared by every framing.

A codec is fed bytes and hands back whole messages; it never touches a socket,
so it is tested byte by byte and fuzzed without a network. Incomplete input is
never an error: ``next_message`` returns ``None`` until a message is whole.
The only exception a codec raises on peer input is :class:`RemoteProtocolError`.
"""

from __future__ import annotations

# typing costs ~6 ms to import; the one-shot client must not pay it. The Protocol
# below is for type checkers; at run time ``Codec`` is a plain class that documents it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object

# Why 64 KiB: a UDP datagram cannot be larger, and it bounds what one client can
# make the server hold per connection before a protocol error closes it.
DEFAULT_MAX_MESSAGE = 64 * 1024


class Codec(Protocol):
    """Stateful decoder for one connection plus a stateless encoder for replies."""

    #: Largest request accepted; longer input raises :class:`MessageTooLarge`.
    max_message: int

    def feed(self, data: bytes) -> None:
        """Append received bytes. May raise ``RemoteProtocolError`` early (e.g. a huge prefix)."""

    def next_message(self) -> bytes | None:
        """Pop the next whole message, or ``None`` if more bytes are needed."""

    def end_of_input(self) -> bytes | None:
        """The peer closed its side: return a final message, or raise if a frame is cut."""

    def encode(self, message: bytes) -> bytes:
        """Frame one outgoing message."""

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet a whole message."""
