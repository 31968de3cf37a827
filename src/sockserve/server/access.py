"""Allow/deny rules by client network, for TCP and UDP, IPv4 and IPv6.

Deny wins over allow; with any allow rule, only matching clients get in.

Fail closed: while any rule exists, a client whose address is not an IP address
(a Unix path named by a PROXY header, an unparsable host) is refused, by deny
rules too: a deny list must not be walked past by claiming a family it cannot
name. An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, how a dual-stack socket
names an IPv4 client) is judged as both its spellings, so a rule written either
way (``10.0.0.0/8`` or ``::ffff:10.0.0.0/104``) matches it.

The Unix-socket peers of a ``unix://`` listener carry no address and are not
judged here: the socket file's mode governs them (the callers skip them).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from .config import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class AccessControl:
    __slots__ = ("_allow", "_deny", "permits")

    def __init__(self, allow: tuple[Network, ...], deny: tuple[Network, ...]) -> None:
        self._allow = allow
        self._deny = deny
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
        forms: tuple[Address, ...] = (addr,)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            forms = (addr.ipv4_mapped, addr)
        if any(a in net for a in forms for net in self._deny):
            return False
        return not self._allow or any(a in net for a in forms for net in self._allow)
