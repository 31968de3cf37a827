"""A private network namespace for the tests that need a non-loopback address.

Test traffic goes only to loopback, Unix sockets, or addresses a test creates in a
network namespace of its own. ``private_netns()`` moves the calling (main) thread
into a fresh namespace with ``unshare(CLONE_NEWNET)`` -- what ``unshare --net``
does -- brings its ``lo`` up and adds ``NETNS_ADDR`` (192.0.2.1, TEST-NET-1) to it:
a non-loopback source that exists only there. Threads and subprocesses started
inside the block (servers, inetd, clients) live in that namespace; the block ends
by moving the thread back (``setns``), and the namespace dies with its last socket.
It needs root and ``ip`` (Debian package iproute2); see ``strict.require``.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from strict import IS_ROOT, require, tool

NETNS_ADDR = "192.0.2.1"
CLONE_NEWNET = 0x40000000
IP = tool("ip", "/usr/sbin/ip", "/sbin/ip")


def _ip(*args: str) -> str:
    assert IP is not None
    return subprocess.run(
        [IP, *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


@contextmanager
def private_netns() -> Iterator[str]:
    """Run the block in a new network namespace holding only ``lo`` (127.0.0.1/8 and
    ``NETNS_ADDR``/32); yields ``NETNS_ADDR``."""
    require(IS_ROOT, "a private network namespace needs root (unshare(CLONE_NEWNET))")
    require(IP is not None, "ip not installed (Debian package iproute2)")
    assert threading.current_thread() is threading.main_thread()
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            require(False, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
        try:
            _ip("link", "set", "lo", "up")
            _ip("addr", "add", f"{NETNS_ADDR}/32", "dev", "lo")
            links = _ip("-o", "link", "show").splitlines()
            # Nothing but lo here: no packet can leave the namespace.
            assert [line.split(":")[1].strip() for line in links] == ["lo"], links
            yield NETNS_ADDR
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the host namespace: {os.strerror(err)}")
    finally:
        os.close(home)
