"""systemd socket activation: the sockets a unit's ``.socket`` passed us (``sd_listen_fds``).

systemd (or ``systemd-socket-activate``) starts the service with the listening
sockets as fds 3, 4, ... and sets ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for
whom: a child that inherited the environment must not take them) and optionally
``LISTEN_FDNAMES`` (``FileDescriptorName=``, colon-separated), which a config
file maps to services. Family and type are read from each socket, so stream and
datagram sockets need no configuration.

Resource handling: the variables are removed from the environment once read
(as ``sd_listen_fds(1)`` does) and the fds are marked close-on-exec, so worker
processes and anything a service runs do not inherit them by accident.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

from ..errors import ConfigError, EndpointError
from ..server.listeners import Listener, adopt_socket

#: The first passed fd: 0-2 are stdin/stdout/stderr.
SD_LISTEN_FDS_START = 3
_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass
class InheritedSocket:
    fd: int
    name: str
    listener: Listener


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = True
) -> list[InheritedSocket]:
    """The sockets passed to this process, or ``[]`` when it was not socket-activated.

    Raises :class:`ConfigError` when the variables are malformed or a passed fd is
    not a socket we can serve.
    """
    env = os.environ if environ is None else environ
    pid, count, names = (env.get(v) for v in _VARS)
    if unset_environment:
        for v in _VARS:
            env.pop(v, None)
    if pid is None or count is None:
        return []
    if not pid.isdigit() or not count.isdigit():
        raise ConfigError(f"socket activation: bad LISTEN_PID={pid!r} or LISTEN_FDS={count!r}")
    if int(pid) != os.getpid():
        return []  # meant for the process that exec'd us, not for us
    n = int(count)
    labels = names.split(":") if names else ["unknown"] * n
    if len(labels) != n:
        raise ConfigError(
            f"socket activation: LISTEN_FDNAMES has {len(labels)} names for {n} fds ({names!r})"
        )
    out: list[InheritedSocket] = []
    for i, label in enumerate(labels):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ConfigError(
                f"socket activation: fd {fd} ({label}) is not a socket: {exc.strerror}"
            ) from None
        try:
            out.append(InheritedSocket(fd, label, adopt_socket(sock)))
        except EndpointError as exc:
            raise ConfigError(f"socket activation ({label}): {exc}") from None
    return out
