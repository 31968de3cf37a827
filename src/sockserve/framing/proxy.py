"""Sans-IO reader for the PROXY protocol header, versions 1 and 2 (HAProxy's proxy-protocol.txt).

A load balancer that terminates the client's TCP connection prepends one header
naming the real client; this module reads it from the first bytes of a
connection and hands back the header and whatever followed it.

Strict, as the spec asks of receivers: the header must be there (no guessing
from the first bytes whether it is), v1 is at most 107 bytes and only the
grammar the spec gives, v2 must carry the 12-byte signature, version 2, a known
command and family, addresses of the family's length and well-formed TLVs. A
mismatch is reported as soon as the first wrong byte arrives, so a client that
is not a proxy fails fast instead of waiting for the header timeout.

Incomplete input returns ``None``, never an exception; the only exception peer
input can raise is :class:`RemoteProtocolError`. Each ``feed`` looks at a
bounded prefix (107 bytes for v1, 16 for a v2 header still missing its body),
so a peer trickling one byte at a time costs linear work.

Why not a library: the PyPI ``proxy-protocol`` package couples its parser to
its own asyncio server, and a sans-IO reader is small enough to own and fuzz.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import RemoteProtocolError

V1_PREFIX = b"PROXY "
#: The spec's bound: "PROXY TCP6 " + two full IPv6 addresses + two ports + CRLF.
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16
#: The 16-bit length field bounds the body; nothing larger can be valid.
V2_MAX = V2_HEADER + 0xFFFF
#: Address block sizes by v2 address family (INET, INET6, UNIX): ports included.
_V2_ADDR_LEN = {1: 12, 2: 36, 3: 216}
_V2_FAMILIES = {
    0x00: "UNSPEC",
    0x11: "TCP4",
    0x12: "UDP4",
    0x21: "TCP6",
    0x22: "UDP6",
    0x31: "UNIX",
    0x32: "UNIX_DGRAM",
}

Command = Literal["PROXY", "LOCAL"]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header.

    ``command`` is ``LOCAL`` for v2 health checks and v1 ``UNKNOWN``: the receiver
    then uses the connection's own addresses, and ``source``/``destination`` are
    ``None``. Otherwise they are ``(host, port)`` tuples, or paths for Unix families
    (printable ASCII, other bytes written ``\\xNN``: they come from the peer and
    end up in logs), or ``None`` for v2 ``UNSPEC``.
    """

    version: int
    command: Command
    family: str
    source: Any = None
    destination: Any = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def relayed(self) -> bool:
        """Whether the header speaks for a relayed client.

        False only for v2 ``LOCAL``: the proxy's own connection (a health check). v1
        ``UNKNOWN`` is relayed: HAProxy sends it for a client it cannot name (one on a
        Unix socket); its v1 health checks carry the check's own TCP4 addresses.
        """
        return not (self.version == 2 and self.command == "LOCAL")

    @property
    def client_ip(self) -> str | None:
        """The relayed client's IP address, or ``None`` when the header names none."""
        src = self.source
        return src[0] if isinstance(src, tuple) else None


class ProxyHeaderReader:
    """Accumulate the first bytes of a connection until a whole header is read.

    ``feed`` returns the header once it is complete (then ``rest`` holds the bytes
    after it, which belong to the application), ``None`` while more are needed.
    """

    __slots__ = ("_buf", "header", "rest")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: ProxyHeader | None = None
        self.rest = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        if self.header is not None:
            self.rest += data
            return self.header
        self._buf += data
        result = parse_header(self._buf)
        if result is None:
            return None
        header, used = result
        self.header = header
        self.rest = bytes(self._buf[used:])
        self._buf = bytearray()
        return header


def parse_header(buf: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    """Parse a header at the start of ``buf``: ``(header, bytes used)``, or ``None`` if cut short."""
    if not buf:
        return None
    if buf[0] == V1_PREFIX[0]:
        return _parse_v1(buf)
    if buf[0] == V2_SIGNATURE[0]:
        return _parse_v2(buf)
    raise RemoteProtocolError(f"no PROXY header: connection starts with {bytes(buf[:8])!r}")


# -- version 1: one text line ----------------------------------------------------------


def _parse_v1(buf: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    head = bytes(buf[:V1_MAX])
    n = min(len(head), len(V1_PREFIX))
    if head[:n] != V1_PREFIX[:n]:
        raise RemoteProtocolError(f"no PROXY header: connection starts with {head[:8]!r}")
    end = head.find(b"\r\n")
    # A CR at the very end may be the first half of the CRLF still on its way.
    line = (head[:-1] if head.endswith(b"\r") else head) if end == -1 else head[:end]
    bad = next((b for b in line if not 0x20 <= b <= 0x7E), None)
    if bad is not None:
        raise RemoteProtocolError(f"PROXY v1 header holds a non-printable byte {bad:#04x}")
    if end == -1:
        if len(head) >= V1_MAX:
            raise RemoteProtocolError(f"PROXY v1 header longer than {V1_MAX} bytes")
        return None
    parts = line.decode("ascii").split(" ")
    proto = parts[1] if len(parts) > 1 else ""
    if proto == "UNKNOWN":
        # The spec: a receiver must ignore anything after UNKNOWN and use the real addresses.
        return ProxyHeader(1, "LOCAL", "UNKNOWN"), end + 2
    if proto not in ("TCP4", "TCP6"):
        raise RemoteProtocolError(f"PROXY v1 header has unknown protocol {proto[:16]!r}")
    if len(parts) != 6:
        raise RemoteProtocolError(
            f"PROXY v1 {proto} header needs 4 fields separated by single spaces, got {line[:V1_MAX]!r}"
        )
    version = 4 if proto == "TCP4" else 6
    src = _v1_address(parts[2], version)
    dst = _v1_address(parts[3], version)
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    return ProxyHeader(1, "PROXY", proto, (src, sport), (dst, dport)), end + 2


def _v1_address(text: str, version: int) -> str:
    try:
        # The spec's grammar has no IPv6 zone ("%eth0"), which ip_address would accept.
        if "%" in text:
            raise ValueError(text)
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise RemoteProtocolError(f"PROXY v1 header has a bad address {text[:48]!r}") from None
    if addr.version != version:
        raise RemoteProtocolError(f"PROXY v1 header: {text!r} is not an IPv{version} address")
    return str(addr)


def _v1_port(text: str) -> int:
    # Decimal 0-65535 without leading zeros, as the spec writes it.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise RemoteProtocolError(f"PROXY v1 header has a bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise RemoteProtocolError(f"PROXY v1 header port {port} is out of range")
    return port


# -- version 2: binary -----------------------------------------------------------------


def _parse_v2(buf: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    head = bytes(buf[:V2_HEADER])
    n = min(len(head), len(V2_SIGNATURE))
    if head[:n] != V2_SIGNATURE[:n]:
        raise RemoteProtocolError(f"no PROXY header: bad v2 signature {head[:n]!r}")
    if len(head) < V2_HEADER:
        return None
    ver_cmd, fam = head[12], head[13]
    length = int.from_bytes(head[14:16], "big")
    if ver_cmd >> 4 != 2:
        raise RemoteProtocolError(f"PROXY v2 header has version {ver_cmd >> 4}, expected 2")
    cmd = ver_cmd & 0x0F
    if cmd not in (0, 1):
        raise RemoteProtocolError(f"PROXY v2 header has unknown command {cmd}")
    if len(buf) < V2_HEADER + length:
        return None
    body = bytes(buf[V2_HEADER : V2_HEADER + length])
    used = V2_HEADER + length
    if cmd == 0:
        # LOCAL (a health check from the proxy itself): the spec says to discard the block.
        return ProxyHeader(2, "LOCAL", _V2_FAMILIES.get(fam, "UNSPEC")), used
    family = _V2_FAMILIES.get(fam)
    if family is None:
        raise RemoteProtocolError(f"PROXY v2 header has unknown address family {fam:#04x}")
    if family == "UNSPEC":
        # Unknown protocol: addresses are to be ignored and the real ones used.
        return ProxyHeader(2, "PROXY", family, tlvs=_v2_tlvs(body)), used
    addr_len = _V2_ADDR_LEN[fam >> 4]
    if length < addr_len:
        raise RemoteProtocolError(
            f"PROXY v2 {family} header length {length} is shorter than its {addr_len}-byte addresses"
        )
    src, dst = _v2_addresses(fam >> 4, body[:addr_len])
    return ProxyHeader(2, "PROXY", family, src, dst, _v2_tlvs(body[addr_len:])), used


def _v2_addresses(af: int, block: bytes) -> tuple[Any, Any]:
    if af == 1:
        src4, dst4 = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
        return (str(src4), _u16(block, 8)), (str(dst4), _u16(block, 10))
    if af == 2:
        src6, dst6 = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        return (str(src6), _u16(block, 32)), (str(dst6), _u16(block, 34))
    return _unix_path(block[:108]), _unix_path(block[108:216])


def _u16(block: bytes, at: int) -> int:
    return int.from_bytes(block[at : at + 2], "big")


def _unix_path(raw: bytes) -> str:
    """The path up to its NUL, printable ASCII kept and other bytes escaped (no log injection)."""
    path = raw.split(b"\0", 1)[0]
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x5C else f"\\x{b:02x}" for b in path)


def _v2_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """Split the type-length-value records after the addresses; their lengths must add up."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        if len(data) - i < 3:
            raise RemoteProtocolError("PROXY v2 header ends inside a TLV's type and length")
        kind, size = data[i], _u16(data, i + 1)
        if i + 3 + size > len(data):
            raise RemoteProtocolError(
                f"PROXY v2 TLV {kind:#04x} of {size} bytes overruns the header"
            )
        out.append((kind, data[i + 3 : i + 3 + size]))
        i += 3 + size
    return tuple(out)


# -- encoding (what a proxy sends; used by tests and tools) ------------------------------


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 header; ``None`` addresses give ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    stream: bool = True,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 header; ``None`` addresses give a LOCAL command."""
    tlv_bytes = b"".join(bytes([k]) + len(v).to_bytes(2, "big") + v for k, v in tlvs)
    if source is None or destination is None:
        return V2_SIGNATURE + b"\x20\x00" + len(tlv_bytes).to_bytes(2, "big") + tlv_bytes
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    fam = (0x10 if src.version == 4 else 0x20) | (0x01 if stream else 0x02)
    body = (
        src.packed
        + dst.packed
        + source[1].to_bytes(2, "big")
        + destination[1].to_bytes(2, "big")
        + tlv_bytes
    )
    return V2_SIGNATURE + bytes([0x21, fam]) + len(body).to_bytes(2, "big") + body
