"""Timestamp server with the standard library's socketserver: a thread per TCP/Unix client,
and the plain UDPServer for datagrams.
"""

from __future__ import annotations

import socketserver
from time import ctime

from _args import parse, run_threads


class TimestampHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            data = self.request.recv(1024)
            if not data:
                break
            self.request.sendall(b"[%s] %s" % (ctime().encode(), data))


class TimestampUDPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(b"[%s] %s" % (ctime().encode(), data), self.client_address)


class TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024


class UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 1024


def main() -> None:
    args = parse()
    servers: list[socketserver.BaseServer] = []
    if args.tcp:
        servers.append(TCPServer(("127.0.0.1", args.tcp), TimestampHandler))
    if args.unix:
        servers.append(UnixServer(args.unix, TimestampHandler))
    if args.udp:
        servers.append(socketserver.UDPServer(("127.0.0.1", args.udp), TimestampUDPHandler))
    run_threads(s.serve_forever for s in servers)


if __name__ == "__main__":
    main()
