"""Who may be served, sans-IO: allow/deny rules (stream and datagram), and the UDP guards.

Both are decisions with no socket in sight, kept apart from the runtimes (which
read, log and send) so that each comparison here, where one wrong ``<`` lets a
denied client, a reflection or a service loop through, is unit-tested and
mutation-tested on its own. The UDP rules are documented on
:class:`~sockserve._engine.datagram.DatagramRuntime`.

Allow/deny rules judge a client by its network, for TCP and UDP, IPv4 and IPv6. Deny
wins over allow; with any allow rule, only matching clients get in.

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

import functools
import ipaddress
from functools import lru_cache
from typing import Any

from ..config import DEFAULT_UDP_RATE, Network, ServerConfig


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


# -- the UDP guards ----------------------------------------------------------------------

#: Ports of the classic small services (echo, discard, daytime, qotd, chargen, time): a
#: datagram from one is a service's reply, never a client's request (inetd drops them too).
CLASSIC_SERVICE_PORTS = frozenset({7, 9, 13, 17, 19, 37})
#: Where the rate limit is off (loopback), replies per second to one source on a fixed port,
#: in bursts of LOOP_BURST: a client keeps its pace, a loop of two services dies out.
LOOP_RATE = 100.0
LOOP_BURST = 100.0
#: Sources a token-bucket table holds before it is cleared (a spoofed-source flood).
MAX_BUCKETS = 65536
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

#: Why a datagram was dropped (``UdpGuard.admit``'s answers other than ``None``).
PRIVILEGED = "privileged port"
SERVICE_PORT = "a service's port"
DENIED = "denied"
RATE = "over the rate limit"
LOOP = "over the loop budget"


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens/s, bursts of ``burst`` (default ``rate``, but
    at least one token: a rate below 1/s is one reply every 1/rate seconds, not none)."""

    __slots__ = ("_buckets", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0) if burst is None else burst
        self._buckets: dict[Any, list[float]] = {}

    def take(self, key: Any, now: float) -> bool:
        """Spend one token of ``key``'s bucket at time ``now`` (s); False if it has none."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if len(buckets) >= MAX_BUCKETS:  # bound the table under a spoofed-source flood
                buckets.clear()
            bucket = buckets[key] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def __len__(self) -> int:
        return len(self._buckets)


class UdpGuard:
    """The guard settings of one datagram endpoint, and its per-source state."""

    def __init__(
        self, config: ServerConfig, *, inet: bool, host: str, replies_larger: bool
    ) -> None:
        self.access = AccessControl(config.allow, config.deny)
        # Port 0 is always dropped (no reply can reach it), whatever the configured minimum.
        self.min_port = max(1, config.udp_min_source_port) if inet else 0
        rate = config.udp_rate
        if rate is None:
            rate = 0.0 if (not inet or is_loopback_host(host)) else DEFAULT_UDP_RATE
        self.rate = rate
        # The loop budget covers what the rate limit leaves open: loopback's default "off".
        self.loop_guard = inet and rate == 0 and config.udp_rate is None
        self.amplify_guard = inet and replies_larger and not config.udp_amplify
        self.own_ports: frozenset[int] = CLASSIC_SERVICE_PORTS
        self._rates = TokenBuckets(rate)
        self._loops = TokenBuckets(LOOP_RATE, LOOP_BURST)

    def serving(self, ports: list[int]) -> None:
        """The UDP ports this server serves: datagrams from them are dropped too."""
        self.own_ports = CLASSIC_SERVICE_PORTS.union(ports)

    def admit(self, host: str, port: int, now: float, ephemeral: tuple[int, int]) -> str | None:
        """``None`` to serve a datagram from ``(host, port)`` at ``now``, else why not.

        ``ephemeral``: this host's range of ports the kernel picks (clients'); a source
        port outside it was chosen, so it is a service's.
        """
        if port < self.min_port or port == 0:
            return PRIVILEGED
        if port in self.own_ports:
            return SERVICE_PORT
        if self.access.active and not self.access.permits(host):
            return DENIED
        if self.rate > 0:
            return None if self._rates.take(host, now) else RATE
        if self.loop_guard:
            lo, hi = ephemeral
            if not lo <= port <= hi and not self._loops.take((host, port), now):
                return LOOP
        return None

    def cap(self, request: bytes, reply: Any, addr: Any) -> Any:
        """The reply as sent: no longer than the request to a non-loopback source while the
        amplification guard is on (an empty result: send nothing)."""
        if self.amplify_guard and len(reply) > len(request) and not is_loopback_peer(addr):
            return reply[: len(request)]
        return reply


@functools.cache
def ephemeral_ports() -> tuple[int, int]:
    """This host's range for ports the kernel picks (clients'); a port outside it was chosen."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def is_loopback_host(host: str) -> bool:
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def is_loopback_peer(addr: Any) -> bool:
    return isinstance(addr, tuple) and is_loopback_host(str(addr[0]))
