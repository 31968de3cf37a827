"""Socket I/O for the hot paths of the server and of ``sockserve bench``: the C
helper ``sockserve._speedups`` where it was built, else the same contracts in
pure Python.

Why: on loopback the system calls cost more than everything sockserve does in
Python, so what is left to save is the work around them. The helper batches UDP
with ``recvmmsg``/``sendmmsg`` and makes stream ``recv``/``send`` cheaper (see
``_speedups.c``). It is optional: it needs a compiler at install time, and Linux;
``SOCKSERVE_PURE_PYTHON=1`` turns it off, to compare or to rule it out (``0`` or empty: on).

Contracts, the same for both implementations:

- ``recv_batch(target, count, size)`` returns 1..count ``(data, address)`` pairs,
  raising ``BlockingIOError`` when nothing is waiting (or the ``OSError`` of the
  first read);
- ``send_batch(target, items)`` sends each ``(bytes, address)`` and returns
  ``None``, or ``(index, errno)`` for each datagram that was not sent;
- ``stream_recv(fd, size)``, ``stream_recv_into(fd, buffer)``, ``stream_send(fd, data)``:
  one non-blocking ``recv``/``send`` on a connected socket (the descriptor is
  non-blocking), errors raised as ``OSError``.

``poll_fast`` has no pure-Python twin: without the helper the hub runs each
connection's own Python hot path, which does the same.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from types import ModuleType
from typing import Any

Batch = list[tuple[bytes, Any]]
RecvBatch = Callable[[Any, int, int], Batch]
SendBatch = Callable[[Any, Batch], "list[tuple[int, int]] | None"]

#: Datagrams per batch: enough that one batch serves every client of a busy round.
BATCH = 64


def recv_loop(sock: socket.socket, count: int, size: int) -> Batch:
    """``recvfrom`` until ``count`` datagrams or the socket is empty."""
    recvfrom = sock.recvfrom
    batch: Batch = [recvfrom(size)]  # raises when nothing is waiting
    append = batch.append
    try:
        for _ in range(count - 1):
            append(recvfrom(size))
    except OSError:
        # Empty now (or a pending ICMP error, which the read consumed): the caller
        # gets what arrived before it, as recvmmsg gives.
        pass
    return batch


def send_loop(sock: socket.socket, items: Batch) -> list[tuple[int, int]] | None:
    """``sendto`` each item; failures come back as ``(index, errno)``."""
    sendto = sock.sendto
    failed: list[tuple[int, int]] | None = None
    for i, (data, addr) in enumerate(items):
        try:
            sendto(data, addr)
        except OSError as exc:
            if failed is None:
                failed = []
            err = exc.errno or errno.EIO
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                failed.extend((j, err) for j in range(i, len(items)))
                break
            failed.append((i, err))
    return failed


def _load() -> tuple[ModuleType | None, str]:
    try:
        from .. import _speedups
    except ImportError:
        return None, "not built"
    if os.environ.get("SOCKSERVE_PURE_PYTHON", "0") not in ("", "0"):
        return None, "off, SOCKSERVE_PURE_PYTHON is set"
    return _speedups, "on"


_speedups, SPEEDUPS_STATE = _load()
"""``SPEEDUPS_STATE`` says why the helper is or is not in use (``sockserve --version``)."""

#: Whether the C helper is in use.
HAVE_SPEEDUPS = _speedups is not None


def readv_into(fd: int, buffer: bytearray) -> int:
    """``recv_into`` without the helper: readv(2) is recv(2) without flags on a socket."""
    return os.readv(fd, [buffer])


stream_recv: Callable[[int, int], bytes]
stream_recv_into: Callable[[int, bytearray], int]
stream_send: Callable[[int, bytes], int]
#: ``poll_fast(epfd, maxevents, fast) -> (nevents, rest, error)``: the epoll hub's
#: batch, plain raw requests answered in C (see ``_speedups.c``); None without the helper.
PollResult = tuple[int, list[tuple[int, int, Any]], "BaseException | None"]
poll_fast: Callable[[int, int, dict[int, Any]], PollResult] | None
if _speedups is not None:
    stream_recv = _speedups.recv
    stream_recv_into = _speedups.recv_into
    stream_send = _speedups.send
    poll_fast = _speedups.poll_fast
else:
    poll_fast = None
    # read(2)/write(2) on a connected stream socket are recv/send without flags.
    stream_recv = os.read
    stream_send = os.write
    stream_recv_into = readv_into


def batch_io(sock: socket.socket) -> tuple[Any, RecvBatch, SendBatch]:
    """``(target, recv_batch, send_batch)`` for ``sock``: the helper on its fd where
    it serves the socket's address family, else the loop on the socket itself."""
    if _speedups is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        return sock.fileno(), _speedups.recv_batch, _speedups.send_batch
    return sock, recv_loop, send_loop
