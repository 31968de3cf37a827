"""The UDP guards' decisions, sans-IO: which datagram to drop, and how far to cut a reply.

Kept apart from :class:`~sockserve._engine.datagram.DatagramRuntime` (which reads, logs and
sends) so that each comparison here, where one wrong ``<`` lets a reflection or a
service loop through, is unit-tested and mutation-tested on its own. The rules are
documented on ``DatagramRuntime``.
"""

from __future__ import annotations

import functools
from typing import Any

from ..config import DEFAULT_UDP_RATE, ServerConfig
from .access import AccessControl

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
