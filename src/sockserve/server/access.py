"""Allow/deny rules by client network, for TCP and UDP, IPv4 and IPv6.

Deny wins over allow; with any allow rule, only matching clients get in.
Unix-socket peers carry no address and are governed by file mode instead.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from .config import Network


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
            return not self._allow
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self._deny):
            return False
        return not self._allow or any(addr in net for net in self._allow)
