"""``sockserve relay LISTEN TARGET [options]``: join every connection on LISTEN to TARGET.

Only parses: the serving options are the server settings' own declarations
(:mod:`sockserve.settings`), the rest builds a :class:`~sockserve.relay.Relay`. Library
errors become one line on stderr and exit 2 (usage) or 1 (a failure while running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError, EndpointError, ServiceError, SockserveError
from .main import EXIT_FAIL, EXIT_USAGE

if TYPE_CHECKING:
    import logging
    from collections.abc import Awaitable, Callable

    from .._engine.signals import StopSignals
    from ..deploy.metrics import MetricsServer
    from ..endpoints import Endpoint
    from ..relay.runner import Relay
    from ..relay.toxics import Toxic

EPILOG = """\
examples:
  sockserve relay tcp://127.0.0.1:8080 unix:///run/app.sock     # TCP in front of a Unix socket
  sockserve relay tcp://127.0.0.1:5000 127.0.0.1:6379            # plain HOST:PORT is tcp://
  sockserve relay tls://0.0.0.0:443 tcp://127.0.0.1:80 --tls-cert c.pem --tls-key k.pem
  sockserve relay tcp://127.0.0.1:9000 tls://example.org:443 --tls-ca ca.pem
  sockserve relay tcp://127.0.0.1:7000 'exec:cat'                # one program per connection
  sockserve relay tcp://127.0.0.1:8000 127.0.0.1:80 --send-proxy-v2 --trace

TARGET: tcp://HOST:PORT, HOST:PORT, tcp://[::1]:PORT, unix:///PATH, tls://HOST:PORT,
udp://HOST:PORT or unixgram:///PATH (datagram LISTEN), or exec:COMMAND (split like a
shell line, no shell unless you write `sh -c '...'`; the peer is in $SOCAT_PEERADDR,
$SOCAT_PEERPORT, $REMOTE_ADDR, $REMOTE_PORT).

exit codes:
  0  stopped by SIGTERM/SIGINT
  1  a failure while running (an endpoint could not be bound)
  2  usage error: bad option, URL or TARGET
"""

#: The server settings that make sense for a relay, shown as ``serve`` shows them.
RELAY_SETTINGS = (
    "max_conns",
    "idle_timeout",
    "backlog",
    "drain_timeout",
    "write_high_water",
    "write_low_water",
    "allow",
    "deny",
    "unix_mode",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "tls_handshake_timeout",
    "max_handshakes",
    "reuse_port",
    "proxy_protocol",
    "proxy_from",
    "proxy_header_timeout",
    "udp_rate",
    "udp_min_source_port",
    "trace",
)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..settings import BY_NAME
    from .serve import add_runtime_options

    p.add_argument("listen", nargs="?", metavar="LISTEN", help="endpoint URL to accept on")
    p.add_argument("target", nargs="?", metavar="TARGET", help="where to relay each connection")
    t = p.add_argument_group("target")
    t.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up connecting to TARGET after this long and reset the client (default 5)",
    )
    t.add_argument("--tls-ca", metavar="FILE", help="tls:// TARGET: trust this CA (PEM)")
    t.add_argument(
        "--server-name", metavar="NAME", help="tls:// TARGET: SNI and the name to verify"
    )
    t.add_argument("--target-cert", metavar="FILE", help="tls:// TARGET: client certificate")
    t.add_argument("--target-key", metavar="FILE", help="tls:// TARGET: its private key")
    t.add_argument(
        "--send-proxy",
        dest="send_proxy",
        action="store_const",
        const=1,
        default=0,
        help="send a PROXY v1 header to TARGET naming the client (HAProxy send-proxy)",
    )
    t.add_argument(
        "--send-proxy-v2",
        dest="send_proxy",
        action="store_const",
        const=2,
        help="send a PROXY v2 (binary) header instead",
    )
    f = p.add_argument_group("faults (Toxiproxy's toxics)")
    f.add_argument(
        "--toxic",
        "--toxic-downstream",
        dest="toxics",
        action="append",
        default=[],
        type=lambda v: ("downstream", v),
        metavar="TYPE=V[,K=V]",
        help="a toxic on the target -> client direction, repeatable: latency=100,jitter=10 "
        "bandwidth=64 slow_close=500 timeout=0 reset_peer=100 slicer=64 limit_data=1000",
    )
    f.add_argument(
        "--toxic-upstream",
        dest="toxics",
        action="append",
        type=lambda v: ("upstream", v),
        metavar="TYPE=V[,K=V]",
        help="a toxic on the client -> target direction, repeatable",
    )
    f.add_argument(
        "--api",
        metavar="HOST:PORT",
        help="serve Toxiproxy's HTTP API here (its port is 8474); alone, without LISTEN/TARGET",
    )
    groups: dict[str, Any] = {}
    for name in RELAY_SETTINGS:
        s = BY_NAME[name]
        group = groups.get(s.group) or groups.setdefault(s.group, p.add_argument_group(s.group))
        kw: dict[str, Any] = {"dest": s.name, "default": None, "help": s.help}
        if s.kind.flag:
            kw.update(action="store_const", const=True)
        else:
            kw.update(metavar=s.metavar, action="append" if s.kind.repeat else "store")
        group.add_argument(*s.options, **kw)
    o = groups["logging and runtime"]
    o.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    add_runtime_options(o)


def build_relays(args: argparse.Namespace) -> list[Relay]:
    """The relay the command line asks for (none with ``--api`` alone); errors name the option."""
    from ..relay.runner import Relay
    from .serve import given_settings

    if args.listen is None and args.target is None:
        if args.api is None:
            raise ConfigError("missing LISTEN and TARGET (or --api HOST:PORT to run the API alone)")
        return []
    if args.target is None:
        raise ConfigError(f"missing TARGET after LISTEN {args.listen}")
    settings = {k: v for k, v in given_settings(args).items() if k in RELAY_SETTINGS}
    origin = {
        "connect_timeout": args.connect_timeout,
        "tls_ca": args.tls_ca,
        "server_name": args.server_name,
        "tls_client_cert": args.target_cert,
        "tls_client_key": args.target_key,
    }
    toxics = [_toxic(stream, text) for stream, text in args.toxics]
    return [
        Relay(
            args.listen,
            args.target,
            toxics=toxics,
            send_proxy=args.send_proxy,
            **settings,
            **origin,
        )
    ]


def _toxic(stream: Literal["upstream", "downstream"], text: str) -> Toxic:
    from ..relay.toxics import parse_toxic

    try:
        return parse_toxic(text, stream)
    except (ValueError, SockserveError) as exc:
        raise ConfigError(f"--toxic {text!r}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from ..logs import configure_logging
    from ..server import foreground

    configure_logging(args.log_format, args.log_level, args.access_log)
    try:
        relays = build_relays(args)
        if args.metrics is not None:
            from ..deploy.metrics import parse_listen

            parse_listen(args.metrics)
        if args.api is not None:
            from ..relay.api import api_endpoint

            api_endpoint(args.api)
    except (ConfigError, EndpointError, ServiceError) as exc:
        print(f"sockserve relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    fg = Foreground(relays, args.api, args.metrics)
    try:
        return foreground.run(fg, args.loop)
    except SockserveError as exc:
        print(f"sockserve relay: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAIL
    except (ImportError, OSError) as exc:
        print(f"sockserve relay: {exc}", file=sys.stderr)
        return EXIT_FAIL


class Foreground:
    """The relays, the API and the metrics page run until SIGTERM/SIGINT (what
    :func:`sockserve.server.foreground.run` drives, as it drives a Server)."""

    def __init__(self, relays: list[Relay], api: str | None, metrics: str | None) -> None:
        self.relays = relays
        self.api = api
        self.metrics = metrics
        self.signals: StopSignals | None = None
        self.forced = False
        self.lost: list[Endpoint] = []
        self.drain_timeout = max((r.config.drain_timeout for r in relays), default=1.0)
        self._stop: asyncio.Event | None = None
        self._asked = False

    async def serve_forever(self) -> None:
        from ..logs import server_log

        self._stop = asyncio.Event()
        if self._asked:
            self._stop.set()
        _ignore_sighup(server_log)
        started: list[Relay] = []
        closers: list[Callable[[], Awaitable[None]]] = []
        try:
            for relay in self.relays:
                await relay.start()
                started.append(relay)
                server_log.info(
                    "relaying %s -> %s",
                    relay.url(),
                    relay.target,
                    extra={"event": "relaying", "endpoint": relay.endpoints[0]},
                )
            if self.api is not None:
                closers += await _start_api(self.api, started)
            if self.metrics is not None:
                http = await _start_metrics(self.metrics, self.relays)
                closers.append(_async(http.close))
            await self._stop.wait()
        finally:
            for close in closers:
                await close()
            for relay in started:
                await relay.stop(drain=not self.forced)

    @property
    def stop_requested(self) -> bool:
        return self._asked

    def request_stop(self, force: bool = False) -> None:
        self._asked = True
        self.forced = self.forced or force
        if self._stop is not None:
            self._stop.set()

    def remove_socket_files(self) -> None:
        for relay in self.relays:
            if relay.server is not None:
                relay.server.remove_socket_files()


def _ignore_sighup(log: logging.Logger) -> None:
    """SIGHUP (``systemctl reload``, logrotate) is logged, never fatal: a relay has no
    configuration file to read again (its settings are its command line)."""
    import signal

    def hup() -> None:
        log.warning("SIGHUP: ignored (sockserve relay has no configuration to reload)")

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hup)


async def _start_api(address: str, relays: list[Relay]) -> list[Callable[[], Awaitable[None]]]:
    """Toxiproxy's API on ``address``; the command line's relay is its proxy ``relay``."""
    from ..relay.api import api_endpoint, serve_api
    from ..relay.proxies import Proxies

    proxies = Proxies()
    for i, relay in enumerate(relays):
        proxies.adopt("relay" if i == 0 else f"relay{i}", relay)
    api = await serve_api(api_endpoint(address), proxies)
    return [api.close, proxies.close]


def _async(close: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def closer() -> None:
        close()

    return closer


async def _start_metrics(address: str, relays: list[Relay]) -> MetricsServer:
    from ..deploy.metrics import MetricsServer, open_metrics_socket
    from ..relay.runner import metrics_page

    http = MetricsServer(open_metrics_socket(address), metrics_page(relays))
    await http.start()
    return http
