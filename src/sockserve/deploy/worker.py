"""A worker process of the supervisor: ``python -m sockserve.deploy.worker`` (not for users).

It reads its instructions pickled on stdin (from the parent, which is trusted:
it started us), adopts the inherited sockets and runs an :class:`App`.
"""

from __future__ import annotations

# First of all: the supervisor started us with SIGHUP blocked; from here it is a flag that
# the app turns into a reload once it is serving (a worker is never killed by SIGHUP).
from .._sighup import hold

hold()

import os  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

from ..errors import SockserveError  # noqa: E402
from ..logs import configure_logging, server_log  # noqa: E402
from ..server.listeners import adopt_socket  # noqa: E402
from .activation import InheritedSocket  # noqa: E402
from .app import App, Plan  # noqa: E402
from .supervisor import EXIT_STARTUP  # noqa: E402


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies, so no worker is orphaned."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before we asked
        raise SystemExit(EXIT_STARTUP)


def main() -> int:
    payload = pickle.load(sys.stdin.buffer)
    _die_with_parent(payload["parent"])
    sys.path[:] = payload["sys_path"]
    spec = payload["spec"]
    configure_logging(spec.log_format, spec.log_level, spec.access_log)
    try:
        channel = socket.socket(fileno=payload["channel"])
        inherited = [
            InheritedSocket(fd, name, adopt_socket(socket.socket(fileno=fd)))
            for fd, name in payload["inherited"]
        ]
        prebound = {
            url: adopt_socket(socket.socket(fileno=fd)) for url, fd in payload["prebound"].items()
        }
        plan = Plan(inherited, prebound, payload["ports"], worker=True)
        app = App(spec, plan, channel)
        return app.run()
    except SockserveError as exc:
        server_log.error("worker %d cannot start: %s", os.getpid(), exc)
        return EXIT_STARTUP


if __name__ == "__main__":
    raise SystemExit(main())
