"""``sockserve relay``: every connection or datagram flow on one endpoint joined to a target,
bytes both ways, with Toxiproxy's faults on the way and its HTTP API to drive them.

The layer above ``deploy``: it serves its listening side with the server's own runtime
(limits, access control, TLS, PROXY protocol, logs) rather than a second engine.
"""

from .runner import Relay, RelayThread
from .session import RelayStats
from .target import Origin, Target, parse_target

__all__ = ["Origin", "Relay", "RelayStats", "RelayThread", "Target", "parse_target"]
