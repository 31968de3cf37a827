"""Sans-IO framings for stream endpoints: ``raw``, ``line`` and ``length``."""

from __future__ import annotations

from ..errors import ConfigError
from .base import DEFAULT_MAX_MESSAGE, Codec
from .length import LengthCodec
from .line import LineCodec
from .raw import RawCodec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (keeps `call` fast)
if TYPE_CHECKING:
    from collections.abc import Callable

FRAMINGS: dict[str, Callable[[int], Codec]] = {
    "raw": RawCodec,
    "line": LineCodec,
    "length": LengthCodec,
}


def make_codec(framing: str, max_message: int = DEFAULT_MAX_MESSAGE) -> Codec:
    """A fresh codec for one connection; raise :class:`ConfigError` for an unknown name."""
    try:
        factory = FRAMINGS[framing]
    except KeyError:
        raise ConfigError(
            f"unknown framing {framing!r}; expected one of {', '.join(FRAMINGS)}"
        ) from None
    return factory(max_message)


__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "FRAMINGS",
    "Codec",
    "LengthCodec",
    "LineCodec",
    "RawCodec",
    "make_codec",
]
