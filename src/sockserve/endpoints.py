"""Endpoint URLs: one parser and one dataclass for server, clients and CLI alike.

Forms::

    tcp://HOST:PORT    udp://HOST:PORT    tls://HOST:PORT    tcp://[::1]:PORT
    unix:///abs/path   unixgram:///abs/path   unix://@abstract-name (Linux)

``tcp://[::]:PORT`` listens on IPv6 only (IPV6_V6ONLY, so a separate ``0.0.0.0``
listener can share the port); ``tcp://*:PORT`` (and ``udp://*``, ``tls://*``) is the
dual-stack form: one socket for every IPv4 and IPv6 address, for servers only.

This module imports nothing but the errors module (not even ``typing`` or
``dataclasses``, 14 ms together) so that a one-shot ``sockserve call`` starts fast.
"""

from __future__ import annotations

from .errors import EndpointError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    Scheme = Literal["tcp", "udp", "tls", "unix", "unixgram"]

SCHEMES: tuple[Scheme, ...] = ("tcp", "udp", "tls", "unix", "unixgram")
_INET: frozenset[str] = frozenset({"tcp", "udp", "tls"})
_STREAM: frozenset[str] = frozenset({"tcp", "tls", "unix"})
#: The host of the dual-stack form ``tcp://*:PORT`` (``[::]`` with IPV6_V6ONLY off).
DUALSTACK_HOST = "*"


class Endpoint:
    """A parsed endpoint. ``host``/``port`` for inet schemes, ``path`` for Unix ones.

    A Unix ``path`` starting with ``@`` names a Linux abstract socket. Immutable
    and hashable (a hand-written frozen dataclass: see the module docstring).
    """

    __slots__ = ("host", "path", "port", "scheme")

    scheme: Scheme
    host: str
    port: int
    path: str

    def __init__(self, scheme: Scheme, host: str = "", port: int = 0, path: str = "") -> None:
        set_ = object.__setattr__
        set_(self, "scheme", scheme)
        set_(self, "host", host)
        set_(self, "port", port)
        set_(self, "path", path)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Endpoint is immutable: cannot set {name}")

    def _key(self) -> tuple[str, str, int, str]:
        return (self.scheme, self.host, self.port, self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Endpoint) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Endpoint(scheme={self.scheme!r}, host={self.host!r}, "
            f"port={self.port!r}, path={self.path!r})"
        )

    def __reduce__(self) -> tuple[type[Endpoint], tuple[str, str, int, str]]:
        return (Endpoint, self._key())

    @property
    def is_stream(self) -> bool:
        return self.scheme in _STREAM

    @property
    def is_inet(self) -> bool:
        return self.scheme in _INET

    @property
    def is_unix(self) -> bool:
        return not self.is_inet

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def is_dualstack(self) -> bool:
        """``tcp://*:PORT``: a server socket for every IPv4 and IPv6 address at once."""
        return self.host == DUALSTACK_HOST

    @property
    def transport(self) -> str:
        """The transport kind as logs and metrics name it (``tls`` stays ``tls``)."""
        return self.scheme

    def address(self) -> str | bytes | tuple[str, int]:
        """The address as ``socket.bind``/``connect`` want it (abstract names as bytes)."""
        if self.is_inet:
            return (self.host, self.port)
        if self.path.startswith("@"):
            return b"\0" + self.path[1:].encode()
        return self.path

    def with_port(self, port: int) -> Endpoint:
        return Endpoint(self.scheme, self.host, port, self.path)

    def url(self) -> str:
        if self.is_inet:
            host = f"[{self.host}]" if self.is_ipv6 else self.host
            return f"{self.scheme}://{host}:{self.port}"
        if self.path.startswith("@"):
            return f"{self.scheme}://{self.path}"
        return f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.url()


def parse_endpoint(url: str, *, default_port: int | None = None) -> Endpoint:
    """Parse an endpoint URL; raise :class:`EndpointError` naming what is wrong.

    ``default_port`` fills in a missing ``:PORT`` for inet schemes.
    """
    if not isinstance(url, str) or not url:
        raise EndpointError("empty endpoint URL; expected e.g. tcp://127.0.0.1:21567")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise EndpointError(
            f"{url!r}: missing scheme; expected tcp://HOST:PORT, udp://HOST:PORT, "
            "tls://HOST:PORT, unix:///PATH or unixgram:///PATH"
        )
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise EndpointError(
            f"{url!r}: unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}"
        )
    if scheme in ("unix", "unixgram"):
        return _parse_unix(url, scheme, rest)
    return _parse_inet(url, scheme, rest, default_port)


def _parse_unix(url: str, scheme: Scheme, rest: str) -> Endpoint:
    if not rest:
        raise EndpointError(f"{url!r}: missing socket path; expected {scheme}:///path/to/socket")
    if "\0" in rest:
        raise EndpointError(f"{url!r}: socket path contains a NUL byte")
    if rest.startswith("@"):
        if len(rest) == 1:
            raise EndpointError(f"{url!r}: empty abstract socket name")
        if len(rest.encode()) > 107:
            raise EndpointError(f"{url!r}: abstract socket name longer than 107 bytes")
        return Endpoint(scheme, path=rest)
    # sun_path holds 108 bytes including the terminating NUL on Linux.
    if len(rest.encode()) > 107:
        raise EndpointError(f"{url!r}: socket path longer than the 107 bytes Unix sockets allow")
    return Endpoint(scheme, path=rest)


def _parse_inet(url: str, scheme: Scheme, rest: str, default_port: int | None) -> Endpoint:
    if "/" in rest or "?" in rest or "#" in rest:
        raise EndpointError(f"{url!r}: unexpected path or query after HOST:PORT")
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not host:
            raise EndpointError(f"{url!r}: unterminated IPv6 address; expected [ADDR]:PORT")
        if tail and not tail.startswith(":"):
            raise EndpointError(f"{url!r}: unexpected text after ]; expected [ADDR]:PORT")
        port_text = tail[1:] if tail else None
    else:
        if rest.count(":") > 1:
            raise EndpointError(f"{url!r}: IPv6 addresses must be bracketed, e.g. tcp://[::1]:PORT")
        host, colon, port_text_s = rest.partition(":")
        port_text = port_text_s if colon else None
        if not host:
            raise EndpointError(f"{url!r}: missing host; expected {scheme}://HOST:PORT")
    if port_text is None or port_text == "":
        if default_port is None:
            raise EndpointError(f"{url!r}: missing port; expected {scheme}://HOST:PORT")
        port = default_port
    else:
        if not port_text.isdigit():
            raise EndpointError(f"{url!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if port > 65535:
            raise EndpointError(f"{url!r}: port {port} is out of range 0-65535")
    return Endpoint(scheme, host=host, port=port)
