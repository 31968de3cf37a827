"""Timestamp server as gevent users write it: StreamServer with a blocking-style handler."""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
from time import ctime  # noqa: E402

import gevent  # noqa: E402
from _args import parse  # noqa: E402
from gevent.server import DatagramServer, StreamServer  # noqa: E402


def handle(sock, address):  # type: ignore[no-untyped-def]
    while True:
        data = sock.recv(1024)
        if not data:
            break
        sock.sendall(b"[%s] %s" % (ctime().encode(), data))
    sock.close()


class TimestampUDP(DatagramServer):
    def handle(self, data, address):  # type: ignore[no-untyped-def]
        self.socket.sendto(b"[%s] %s" % (ctime().encode(), data), address)


def main() -> None:
    args = parse()
    servers = []
    if args.tcp:
        servers.append(StreamServer(("127.0.0.1", args.tcp), handle))
    if args.unix:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.unix)
        listener.listen(1024)
        servers.append(StreamServer(listener, handle))
    if args.udp:
        servers.append(TimestampUDP(("127.0.0.1", args.udp)))
    for s in servers:
        s.start()
    gevent.wait()


if __name__ == "__main__":
    main()
