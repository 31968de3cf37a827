"""Socket I/O for the hot paths of the server and of ``sockserve bench``: the C
helper ``sockserve._speedups`` where it was built, else its pure-Python twins.

Why: on loopback the system calls cost more than everything sockserve does in
Python, so what is left to save is the work around them. The helper batches UDP
with ``recvmmsg``/``sendmmsg``, makes stream ``recv``/``send`` cheaper and answers
plain raw requests inside its epoll poll (see ``_speedups_c/``). It is optional: it
needs a compiler at install time, and Linux; ``SOCKSERVE_PURE_PYTHON=1`` turns it
off, to compare or to rule it out (``0`` or empty: on).

THE CONTRACT (the one place it is written; ``_speedups_c/`` and ``fastpath.py`` point
here, and ``tests/unit/test_fastpath_fuzz.py`` holds both sides to it)
----------------------------------------------------------------------------------

Arguments. Every number (fd, count, size, maxevents, port, ...) is an ``int`` or a
subclass (``bool`` too); anything else, an object with ``__index__`` included, is a
``TypeError`` (converting it would run Python code mid-call). An fd outside the C
``int`` range is an ``OverflowError``; a negative one fails in the system call
(``EBADF``). Counts and sizes out of range are a ``ValueError``. Data to send is
``bytes`` (or a subclass), else ``TypeError``. Every call is non-blocking and raises
the ``OSError`` of its system call (``BlockingIOError`` when nothing is ready).

Streams, on a connected non-blocking stream socket:

- ``recv(fd, size) -> bytes``: size is 1..MAX_SIZE; ``b""`` only at end of stream.
- ``recv_into(fd, buffer) -> int``: buffer is writable (``TypeError`` without the
  buffer protocol, ``BufferError`` if read-only) and not empty (``ValueError``: 0
  means end of stream, and on a datagram socket it would discard a datagram).
- ``send(fd, data) -> int``: how many bytes went.

Datagrams, on a UDP socket (anything else is a ``ValueError`` before any I/O, so no
data is read and lost); C takes its fd, the twin the socket:

- ``recv_batch(fd, count, size)``: count is 1..MAX_BATCH and size 1..MAX_SIZE, both
  checked before reading. 1..count ``(data, address)`` pairs, each datagram cut to
  size like ``recvfrom``; ``BlockingIOError`` when none is waiting.
- ``send_batch(fd, items) -> None | list[(index, errno)]``: items is a ``list`` of
  ``(bytes, address)`` tuples. Each chunk of MAX_BATCH items is checked, then sent;
  a bad item raises (earlier chunks are gone). Per address, in this order: a tuple
  of 2 (IPv4) or 4 (IPv6) items, else ``TypeError``; port, flowinfo, scope_id ints,
  else ``TypeError``; the host exactly a ``str``, else ``TypeError``; port 0..65535,
  flowinfo 0..0xFFFFF, scope_id 0..2**32-1, else ``OverflowError``; the host a
  numeric address of the tuple's family, else ``ValueError`` (an IPv6 host may end
  in a non-empty ``%zone``, which is ignored: the scope id is in the tuple). What
  the kernel refuses comes back as ``(index, errno)`` (an IPv4 address on an IPv4
  socket of family AF_INET6 is sent v4-mapped; an IPv6 one on an AF_INET socket is
  ``EAFNOSUPPORT``); from a full buffer (``EAGAIN``) on, every item is reported.
  Addresses are the tuples ``recvfrom`` gives: ``(host, port)``, or
  ``(host, port, flowinfo, scope_id)``.

The fast path, ``poll_fast(ep, maxevents, fast) -> (nevents, items, error)``
(C takes the epoll fd, the twin in ``fastpath.py`` the ``select.epoll``): one
``epoll_wait`` with timeout 0 for at most maxevents (1..MAX_EVENTS) events. ``fast``
is a ``dict`` fd -> spec ``(member, handler, ctx, max_message, kind)`` of
connections whose plain requests may be answered here: kind names the framing
(``KIND_RAW``, ``KIND_LINE``, ``KIND_LENGTH``, ``KIND_PUMP`` below; anything else a ``ValueError``; what
comes next gets its own kind instead of another copy of this logic), max_message an
int >= 0. An event that is exactly EPOLLIN on an fd in ``fast`` is served: one read
of up to MAX_SIZE bytes. Each request: ``member.active = True`` (the only member
attribute either side touches; framed kinds set it once per chunk, before its first
whole message), ``handler(request, ctx)``, and its reply is sent
here only if it is exact ``bytes`` and ``fast[fd]`` is still that same spec (else
the connection was closed, its fd reused or it is writing: Python sends).

``KIND_RAW``: a chunk of at most max_message bytes is one request, its reply sent at
once; what is not finished comes back as one item (the table below). ``KIND_LINE`` / ``KIND_LENGTH`` (a spec is in ``fast`` only while its codec
holds nothing): the chunk is split as ``framing/line.py`` / ``length.py`` split it,
a line ending at ``\n`` with one ``\r`` before it stripped, a frame after its 4-byte
big-endian prefix. Each whole message of at most max_message bytes is answered in
order; the replies, framed as the codec frames them (``+ b"\n"``, or the prefix
first), are gathered and sent in one send, and again each time FLUSH_AT (MAX_SIZE)
bytes have gathered. The first thing not finished here ends the chunk, and the
items of that fd come back in this order, each at most once:

1. the gathered replies: PARTIAL with what the kernel did not take (also what was
   gathered when ``fast[fd]`` changed: none of it sent), or ERRNO of the send;
2. RAISED (a handler raised), or REPLY (not exact bytes, too long for a prefix, or
   ``fast[fd]`` changed);
3. DATA with the chunk's unread rest (a partial tail, a message over the cap, what
   followed 2. or a PARTIAL), which the codec is fed as it is, so it continues
   exactly where this stopped, its caps and errors included; not after RAISED or
   ERRNO (the connection is failing).

What is not finished comes back as items ``(fd, tag, value, member)``:

==========  =====  ===============================  ===================================
tag          int   value                            the member's part
==========  =====  ===============================  ===================================
EVENT         1    the event bits (member is None)  look the fd up, ``on_event(bits)``
DATA          2    bytes read, not answered (raw:   feed them to the codec, which
                   > max_message)                   splits and answers them
EOF           3    None                             end of stream
ERRNO         4    recv's or send's errno           close with that ``OSError``
RAISED        5    what the handler raised, any     its failure (or a real Ctrl-C, which
                   ``BaseException``, traceback on  goes on up); even when its code
                                                    closed the connection
REPLY         6    what the handler returned, not   send it as any reply (bytes-like) or
                   sent here (not exact bytes, or   report it; an exception object
                   no longer fast)                  returned is a reply, never raised
PARTIAL       7    the unsent rest of the reply     keep it (after what it already
                   (framed: of the gathered ones)   holds), send when writable
==========  =====  ===============================  ===================================

``KIND_PUMP`` (the relay's pump, ``_speedups_c/pump.c``, twin ``fastpath.serve_pump``):
the spec is ``(member, peer_fd, state, splice_after, KIND_PUMP)``, state a
``bytearray`` of PUMP_STATE (40) bytes, five native int64s: bytes moved to the peer,
bytes moved in reads of at least BIG_READ, the pipe's read and write fds (-1: none
yet), bytes held in the pipe. Up to PUMP_READS reads while each fills MAX_SIZE, each
sent to peer_fd at once; once the big reads reach splice_after the direction opens its
pipe (``pipe2``, PIPE_SIZE) and moves through it with ``splice``. What peer_fd does not
take is PARTIAL (the unsent bytes; ``None`` when they wait in the pipe, and at once
while the pipe holds any); end of stream EOF; a failed read or send ERRNO. No handler,
no ``active``: the member reads its state.

DONE (0: answered in full, the handler returned None, or nothing to read after
all) makes no item. ``error`` is None, or an exception that stopped the batch (not a
handler's: a bad spec, a failed ``active`` assignment, MemoryError); ``items`` then
holds what was taken off sockets before it (the failing connection's chunk is lost
with it), which the caller finishes first, then raises ``error``.
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
#: The contract's limits (the C helper's constants of the same names).
MAX_BATCH = 256
MAX_SIZE = 65536
MAX_EVENTS = 1024
MAX_FLOWINFO = 0xFFFFF
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_UDP = (socket.IPPROTO_UDP, getattr(socket, "IPPROTO_UDPLITE", 136))

# Outcome tags of poll_fast items, and framing kinds of specs (see THE CONTRACT).
DONE, EVENT, DATA, EOF, ERRNO, RAISED, REPLY, PARTIAL = range(8)
KIND_RAW, KIND_LINE, KIND_LENGTH, KIND_PUMP = range(4)
#: A pump spec's state size; reads per event; what counts as big; its pipe's size (pump.c).
PUMP_STATE, PUMP_READS, BIG_READ, PIPE_SIZE = 40, 4, 16384, 256 * 1024


def int_arg(value: object, lo: int, hi: int, what: str, error: type[Exception]) -> int:
    """An int argument in lo..hi, checked as the C helper checks it."""
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise error(f"{what} must be {lo}..{hi}, not {value!r}")
    return value


def fd_arg(fd: object) -> int:
    return int_arg(fd, _INT_MIN, _INT_MAX, "fd", OverflowError)


# -- datagrams -------------------------------------------------------------------------


def recv_loop(sock: socket.socket, count: int, size: int) -> Batch:
    """``recvfrom`` until ``count`` datagrams or the socket is empty (any family)."""
    int_arg(count, 1, MAX_BATCH, "recv_batch: count", ValueError)
    int_arg(size, 1, MAX_SIZE, "recv_batch: size", ValueError)
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
    """``sendto`` each item; failures come back as ``(index, errno)`` (any family)."""
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


def _require_udp(sock: socket.socket, who: str) -> None:
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) not in _UDP:
        raise ValueError(f"{who}: fd {sock.fileno()} is not a UDP socket")


def recv_batch(sock: socket.socket, count: int, size: int) -> Batch:
    """The twin of the helper's ``recv_batch`` (see THE CONTRACT)."""
    int_arg(count, 1, MAX_BATCH, "recv_batch: count", ValueError)
    int_arg(size, 1, MAX_SIZE, "recv_batch: size", ValueError)
    _require_udp(sock, "recv_batch")
    return recv_loop(sock, count, size)


def _numeric_host(host: str, family: int) -> str:
    numeric, zoned, zone = host.partition("%")
    ok = "\0" not in host and (not zoned or (family == socket.AF_INET6 and zone != ""))
    try:
        if ok:
            socket.inet_pton(family, numeric)
            return numeric
    except OSError:
        pass
    name = "IPv4" if family == socket.AF_INET else "IPv6"
    raise ValueError(f"send_batch: {host!r} is not a numeric {name} address")


def _sendable(addr: object, v6_socket: bool) -> tuple[Any, ...] | int:
    """The address for ``sendto``, or the errno the kernel gives the helper for it."""
    if not isinstance(addr, tuple) or len(addr) not in (2, 4):
        raise TypeError(
            "send_batch: an address is (host, port) or (host, port, flowinfo, scope_id)"
        )
    if not all(isinstance(part, int) for part in addr[1:]):
        raise TypeError(f"send_batch: {addr!r} has a part that is not an int")
    host = addr[0]
    if type(host) is not str:
        raise TypeError("send_batch: the host must be a str")
    int_arg(addr[1], 0, 65535, "send_batch: port", OverflowError)
    if len(addr) == 4:
        int_arg(addr[2], 0, MAX_FLOWINFO, "send_batch: flowinfo", OverflowError)
        int_arg(addr[3], 0, 2**32 - 1, "send_batch: scope_id", OverflowError)
        numeric = _numeric_host(host, socket.AF_INET6)
        return (numeric, *addr[1:]) if v6_socket else errno.EAFNOSUPPORT
    numeric = _numeric_host(host, socket.AF_INET)
    return ("::ffff:" + numeric, addr[1], 0, 0) if v6_socket else (numeric, addr[1])


def send_batch(sock: socket.socket, items: Batch) -> list[tuple[int, int]] | None:
    """The twin of the helper's ``send_batch`` (see THE CONTRACT)."""
    if not isinstance(items, list):
        raise TypeError("send_batch: items must be a list")
    _require_udp(sock, "send_batch")
    v6 = sock.family == socket.AF_INET6
    failed: list[tuple[int, int]] = []
    start = 0
    while start < len(items):
        chunk: list[tuple[int, bytes, tuple[Any, ...] | int]] = []
        for i in range(start, min(start + MAX_BATCH, len(items))):
            item = items[i]
            if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], bytes):
                raise TypeError(f"send_batch: item {i} is not a (bytes, address) pair")
            chunk.append((i, item[0], _sendable(item[1], v6)))
        for i, data, where in chunk:
            if isinstance(where, int):
                failed.append((i, where))
                continue
            try:
                sock.sendto(data, where)
            except OSError as exc:
                err = exc.errno or errno.EIO
                if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                    failed.extend((j, err) for j in range(i, len(items)))
                    return failed
                failed.append((i, err))
        start += MAX_BATCH
    return failed or None


# -- streams ---------------------------------------------------------------------------


def py_recv(fd: int, size: int) -> bytes:
    """The twin of the helper's ``recv``: read(2) is recv(2) without flags on a socket."""
    fd_arg(fd)
    int_arg(size, 1, MAX_SIZE, "recv: size", ValueError)
    return os.read(fd, size)


def readv_into(fd: int, buffer: bytearray | memoryview) -> int:
    """The twin of the helper's ``recv_into``: readv(2) is recv(2) without flags."""
    fd_arg(fd)
    view = memoryview(buffer)
    if view.readonly:
        raise BufferError("recv_into: the buffer is read-only")
    if not view.nbytes:
        raise ValueError("recv_into: the buffer is empty")
    return os.readv(fd, [view])


def py_send(fd: int, data: bytes) -> int:
    """The twin of the helper's ``send``: write(2) is send(2) without flags."""
    fd_arg(fd)
    if not isinstance(data, bytes):
        raise TypeError(f"send: data must be bytes, not {type(data).__name__}")
    return os.write(fd, data)


# -- which one ------------------------------------------------------------------------


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

stream_recv: Callable[[int, int], bytes]
stream_recv_into: Callable[[int, bytearray], int]
stream_send: Callable[[int, bytes], int]
#: ``(nevents, items, error)`` of ``poll_fast`` (see THE CONTRACT).
PollResult = tuple[int, list[tuple[int, int, Any, Any]], "BaseException | None"]
#: The helper's ``poll_fast(epfd, maxevents, fast)``; None without it (the hub then
#: uses the twin, ``fastpath.poll_fast``, on its ``select.epoll``).
c_poll_fast: Callable[[int, int, dict[int, Any]], PollResult] | None
if _speedups is not None:
    stream_recv = _speedups.recv
    stream_recv_into = _speedups.recv_into
    stream_send = _speedups.send
    c_poll_fast = _speedups.poll_fast
else:
    c_poll_fast = None
    stream_recv = py_recv
    stream_send = py_send
    stream_recv_into = readv_into


def batch_io(sock: socket.socket) -> tuple[Any, RecvBatch, SendBatch]:
    """``(target, recv_batch, send_batch)`` for ``sock``: the helper on its fd for a UDP
    socket, else the loops on the socket itself (its addresses come from ``recvfrom``)."""
    udp = sock.type == socket.SOCK_DGRAM and sock.family in (socket.AF_INET, socket.AF_INET6)
    if _speedups is not None and udp:
        return sock.fileno(), _speedups.recv_batch, _speedups.send_batch
    return sock, recv_loop, send_loop
