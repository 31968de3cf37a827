"""Sans-IO framings for stream endpoints: ``raw``, ``line`` and ``length``.

Each codec module is imported on first use, so a one-shot ``sockserve call``
loads only the framing it speaks.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import DEFAULT_MAX_MESSAGE, Codec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (keeps `call` fast)
if TYPE_CHECKING:
    from collections.abc import Callable

    from .length import LengthCodec
    from .line import LineCodec
    from .raw import RawCodec

#: Framing name -> (module in this package, codec class).
FRAMINGS: dict[str, tuple[str, str]] = {
    "raw": ("raw", "RawCodec"),
    "line": ("line", "LineCodec"),
    "length": ("length", "LengthCodec"),
}
_factories: dict[str, Callable[[int], Codec]] = {}


def codec_factory(framing: str) -> Callable[[int], Codec]:
    """The codec class for ``framing``; raise :class:`ConfigError` for an unknown name."""
    factory = _factories.get(framing)
    if factory is None:
        try:
            module, name = FRAMINGS[framing]
        except KeyError:
            raise ConfigError(
                f"unknown framing {framing!r}; expected one of {', '.join(FRAMINGS)}"
            ) from None
        factory = _factories[framing] = getattr(
            __import__(f"{__name__}.{module}", fromlist=[name]), name
        )
    return factory


def make_codec(framing: str, max_message: int = DEFAULT_MAX_MESSAGE) -> Codec:
    """A fresh codec for one connection; raise :class:`ConfigError` for an unknown name."""
    return codec_factory(framing)(max_message)


def __getattr__(name: str) -> object:
    for framing, (_, cls) in FRAMINGS.items():
        if cls == name:
            return codec_factory(framing)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "FRAMINGS",
    "Codec",
    "LengthCodec",
    "LineCodec",
    "RawCodec",
    "codec_factory",
    "make_codec",
]
