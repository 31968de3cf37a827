"""``exec:COMMAND`` targets: one process per connection, as inetd's ``nowait``, ``ncat
--exec`` and socat's ``EXEC:`` run one.

The process's stdin and stdout are one end of a socket pair (inetd gives its programs
the socket itself the same way), so the relay joins the other end exactly as it joins a
TCP target: half-close works (our ``shutdown(SHUT_WR)`` is EOF on the program's stdin;
its exit is EOF to us), and so does backpressure. Its stderr goes to the log, a line at a
time, naming the program and the peer. The environment carries the peer's address under
the names socat (``SOCAT_PEERADDR``, ``SOCAT_PEERPORT``) and CGI/inetd tools
(``REMOTE_ADDR``, ``REMOTE_PORT``, ``REMOTE_HOST``) use.

Resource handling: the process is killed (SIGKILL, then reaped) when the connection
ends, so a program that ignores EOF cannot outlive its client. Error handling: a program
that cannot start raises ``OSError`` naming it, which closes only that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from ..logs import fmt_peer

relay_log = logging.getLogger("sockserve.relay")

#: Longest stderr line logged whole; longer ones are cut (a program spewing binary).
MAX_STDERR_LINE = 4096


def peer_environment(peer: Any) -> dict[str, str]:
    """The peer-address variables for a connection from ``peer`` (inet tuple or Unix path)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        addr, port = str(peer[0]), str(peer[1])
    else:
        addr, port = str(peer or ""), ""
    env = {"SOCAT_PEERADDR": addr, "REMOTE_ADDR": addr, "REMOTE_HOST": addr}
    if port:
        env.update(SOCAT_PEERPORT=port, REMOTE_PORT=port)
    return env


class ExecChild:
    """The process behind one connection and the stderr reader that logs it."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, peer: Any) -> None:
        self.proc = proc
        self.name = name
        self.peer = peer
        self._stderr = asyncio.ensure_future(self._log_stderr())

    async def _log_stderr(self) -> None:
        stream = self.proc.stderr
        if stream is None:
            return
        while True:
            try:
                line = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):  # over the reader's limit
                line = await stream.read(MAX_STDERR_LINE)
            if not line:
                return
            relay_log.warning(
                "exec %s (for %s) stderr: %s",
                self.name,
                fmt_peer(self.peer),
                line[:MAX_STDERR_LINE].decode(errors="replace").rstrip("\n"),
                extra={"event": "exec_stderr"},
            )

    def close(self) -> None:
        """Kill the process if it still runs, and reap it in the background."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        reap = asyncio.ensure_future(self.proc.wait())
        reap.add_done_callback(lambda _: self._stderr.cancel())


async def spawn(
    argv: tuple[str, ...], peer: Any, factory: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.Transport, asyncio.Protocol, ExecChild]:
    """Start ``argv`` for a connection from ``peer``; its stdio joined to a transport."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = {**os.environ, **peer_environment(peer)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # a Ctrl-C to the relay is not the program's
            )
        except OSError as exc:
            raise OSError(exc.errno, f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        child = ExecChild(proc, argv[0], peer)
        try:
            transport, protocol = await loop.create_unix_connection(factory, sock=ours)
        except BaseException:
            child.close()
            raise
    except BaseException:
        ours.close()
        raise
    return transport, protocol, child
