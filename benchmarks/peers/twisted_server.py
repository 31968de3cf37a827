"""Timestamp server as Twisted users write it: a Protocol and a DatagramProtocol on the reactor."""

from __future__ import annotations

from time import ctime

from _args import parse
from twisted.internet import protocol, reactor


class Timestamp(protocol.Protocol):
    def dataReceived(self, data):  # type: ignore[no-untyped-def]
        self.transport.write(b"[%s] %s" % (ctime().encode(), data))


class TimestampUDP(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):  # type: ignore[no-untyped-def]
        self.transport.write(b"[%s] %s" % (ctime().encode(), data), addr)


def main() -> None:
    args = parse()
    factory = protocol.Factory.forProtocol(Timestamp)
    if args.tcp:
        reactor.listenTCP(args.tcp, factory, backlog=1024, interface="127.0.0.1")
    if args.unix:
        reactor.listenUNIX(args.unix, factory, backlog=1024)
    if args.udp:
        reactor.listenUDP(args.udp, TimestampUDP(), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
