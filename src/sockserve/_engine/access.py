"""Allow/deny rules by client network, for TCP and UDP, IPv4 and IPv6.

Deny wins over allow; with any allow rule, only matching clients get in.

Fail closed: while any rule exists, a client whose address is not an IP address
(a Unix path named by a PROXY header, an unparsable host) is refused, by deny
rules too: a deny list must not be walked past by claiming a family it cannot
name. An IPv4 client is an IPv4 client however it is spelled: the IPv4-mapped
address a dual-stack socket names it by (``::ffff:10.0.0.1``) is judged as
``10.0.0.1``, and a rule written in mapped form (``::ffff:10.0.0.0/104``) is the
IPv4 network it spells (``10.0.0.0/8``), so either rule meets either spelling.

The Unix-socket peers of a ``unix://`` listener carry no address and are not
judged here: the socket file's mode governs them (the callers skip them).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from ..config import Network


class AccessControl:
    __slots__ = ("_allow", "_deny", "permits")

    def __init__(self, allow: tuple[Network, ...], deny: tuple[Network, ...]) -> None:
        self._allow = tuple(map(_unmapped, allow))
        self._deny = tuple(map(_unmapped, deny))
        # Cached per host: a flood from one source costs one lookup, not a CIDR scan.
        self.permits = lru_cache(maxsize=4096)(self._permits)

    @property
    def active(self) -> bool:
        return bool(self._allow or self._deny)

    def _permits(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return not self.active
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self._deny):
            return False
        return not self._allow or any(addr in net for net in self._allow)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(net: Network) -> Network:
    """``::ffff:a.b.c.d/N`` (N >= 96) as the IPv4 network ``a.b.c.d/(N-96)`` it stands for."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        v4 = net.network_address.ipv4_mapped
        assert v4 is not None
        return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net
