"""``sockserve relay``: every connection or datagram flow on one endpoint joined to a target,
bytes both ways, with Toxiproxy's faults on the way and its HTTP API to drive them.

The layer above ``deploy``: it serves its listening side with the server's own runtime
(limits, access control, TLS, PROXY protocol, logs) rather than a second engine.

Public API: ``Relay``/``RelayThread`` (one LISTEN joined to one TARGET), ``Toxic`` and
``ToxicSet`` (the faults), ``ApiThread``/``serve_api`` (Toxiproxy's HTTP API, in a thread
or on a running loop) over ``Proxies`` (its named proxies).
"""

from .api import ApiServer, ApiThread, serve_api
from .proxies import Proxies
from .runner import Relay, RelayThread
from .session import RelayStats
from .target import Origin, Target, parse_target
from .toxics import Toxic, ToxicSet

__all__ = [
    "ApiServer",
    "ApiThread",
    "Origin",
    "Proxies",
    "Relay",
    "RelayStats",
    "RelayThread",
    "Target",
    "Toxic",
    "ToxicSet",
    "parse_target",
    "serve_api",
]
