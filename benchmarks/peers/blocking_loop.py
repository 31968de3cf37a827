"""The textbook blocking timestamp server: accept one client, serve it until it leaves;
recvfrom/sendto for UDP. One loop per endpoint, each in its own thread (only one is driven at a time).

It serves one stream client at a time by design, so the runner drives its stream endpoints with
one connection only.
"""

from __future__ import annotations

import functools
import socket
from time import ctime

from _args import parse, run_threads


def stream_loop(server: socket.socket) -> None:
    while True:
        conn, _ = server.accept()
        try:
            while True:
                data = conn.recv(1024)
                if not data:
                    break
                conn.send(b"[%s] %s" % (ctime().encode(), data))
        except ConnectionError:
            pass  # the one line of hardening: a load generator that stops resets its connections
        conn.close()


def udp_loop(server: socket.socket) -> None:
    while True:
        data, addr = server.recvfrom(1024)
        server.sendto(b"[%s] %s" % (ctime().encode(), data), addr)


def main() -> None:
    args = parse()
    loops = []
    if args.tcp:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", args.tcp))
        s.listen(5)
        loops.append((stream_loop, s))
    if args.unix:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(args.unix)
        s.listen(5)
        loops.append((stream_loop, s))
    if args.udp:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", args.udp))
        loops.append((udp_loop, s))
    run_threads(functools.partial(fn, s) for fn, s in loops)


if __name__ == "__main__":
    main()
