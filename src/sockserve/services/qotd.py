"""RFC 865 quote of the day: one short quotation, then close (TCP) or one datagram (UDP).

The RFC asks for a quote "less than 512 characters"; we also keep it to
printable ASCII with CRLF line ends, so any terminal or ``recv(512)`` client
shows it whole. ``--quotes FILE`` (``service_options["quotes"]``) replaces the
built-in set; the file is checked once at start, so a bad one fails the
start with a message naming the line, not a client later.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..service import Context, Service, StreamSession
from . import builtin

#: RFC 865: "the quote ... should be less than 512 characters".
MAX_QUOTE = 511

BUILTIN_QUOTES = (
    "The quieter you become, the more you are able to hear. - Rumi",
    "Be conservative in what you do, be liberal in what you accept from others.\n"
    "- Jon Postel, RFC 793",
    "We reject kings, presidents and voting. We believe in rough consensus and running code.\n"
    "- David Clark",
    "The network is the computer. - John Gage",
    "Any sufficiently advanced technology is indistinguishable from magic. - Arthur C. Clarke",
    "Simplicity is prerequisite for reliability. - Edsger W. Dijkstra",
    "There are only two hard things in Computer Science: cache invalidation and naming things.\n"
    "- Phil Karlton",
    "A distributed system is one in which the failure of a computer you didn't even know\n"
    "existed can render your own computer unusable. - Leslie Lamport",
)


def encode_quote(text: str, where: str = "quote") -> bytes:
    """Lines joined and ended with CRLF; ConfigError if not printable ASCII or too long."""
    lines = [line.rstrip() for line in text.strip("\n").split("\n")]
    for i, line in enumerate(lines):
        bad = next((c for c in line if not " " <= c <= "~"), None)
        if bad is not None:
            raise ConfigError(
                f"{where}, line {i + 1}: {bad!r} is not printable ASCII (RFC 865 quotes are text)"
            )
    data = "".join(line + "\r\n" for line in lines).encode("ascii")
    if len(data) > MAX_QUOTE:
        raise ConfigError(
            f"{where} is {len(data)} bytes with CRLFs; RFC 865 wants under 512: shorten it"
        )
    return data


def parse_quotes(text: str, source: str) -> tuple[bytes, ...]:
    """Quotes separated by blank lines or lines holding only ``%`` (fortune files)."""
    quotes: list[bytes] = []
    block: list[str] = []
    start = 1

    def flush() -> None:
        if any(line.strip() for line in block):
            quotes.append(encode_quote("\n".join(block), f"{source}: quote at line {start}"))
        block.clear()

    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.strip() == "%":
            flush()
            start = number + 1
        else:
            block.append(line)
    flush()
    if not quotes:
        raise ConfigError(f"{source}: no quotes found (separate them with blank lines)")
    return tuple(quotes)


def load_quotes(path: str) -> tuple[bytes, ...]:
    try:
        with open(path, encoding="ascii", errors="strict", newline=None) as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"quotes file {path}: byte {exc.start} is not ASCII (RFC 865 quotes are ASCII text)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read quotes file {path}: {exc.strerror or exc}") from None
    return parse_quotes(text, f"quotes file {path}")


def make_service(quotes: Sequence[bytes]) -> Service:
    """A qotd service answering with one of ``quotes`` (already encoded) at random."""
    choices = tuple(quotes)

    def pick() -> bytes:
        return random.choice(choices)

    class QotdSession(StreamSession):
        def on_connect(self) -> None:
            self.conn.write(pick())
            self.conn.close()

    def qotd(request: bytes, ctx: Context) -> bytes:
        return pick()

    return builtin(
        "qotd",
        handler=qotd,
        stream=QotdSession,
        replies_larger=True,  # US-CERT TA14-017A: 140.3x
        options={"quotes": choices},
        configure=configure,
    )


def configure(options: dict[str, Any]) -> Service:
    unknown = sorted(set(options) - {"quotes"})
    if unknown:
        raise ConfigError(f"service qotd has no option {', '.join(unknown)} (it takes: quotes)")
    path = options.get("quotes")
    if path is None:
        return SERVICE
    return make_service(load_quotes(str(path)))


SERVICE = make_service(tuple(encode_quote(q) for q in BUILTIN_QUOTES))
