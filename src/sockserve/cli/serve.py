"""``sockserve serve [SERVICE] [--listen URL]...``: parse options into a config, run the server.

Defaults come from :class:`ServerConfig` (written once, there); only the CLI
turns library errors into one-line messages and exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError, EndpointError, ServiceError, SockserveError
from .main import EXIT_FAIL, EXIT_USAGE

EPILOG = """\
examples:
  sockserve serve                                   # timestamp, TCP+UDP 127.0.0.1:21567
  sockserve serve upper:upper -l tcp://127.0.0.1:9000 --framing line   # upper.py in .
  sockserve serve echo -l tcp://*:2007 -l udp://*:2007    # IPv4 and IPv6 (dual stack)
  sockserve serve -l unix:///tmp/ts.sock --trace    # hex dump of every request/reply
  sockserve serve --config services.toml --workers 4 --metrics 127.0.0.1:9100

exit codes:
  0  stopped by SIGTERM/SIGINT after draining
  1  forced exit (a second SIGINT, drain timeout) or a runtime failure
  2  usage error: bad option, URL, service, handler signature or config file
"""


def _size(text: str) -> int:
    """Bytes with an optional K/M/G suffix (binary): 64K, 1M."""
    from ..config import parse_size

    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad size: {exc}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _timeout(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number of seconds {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seconds must be >= 0: {text!r}")
    return value or None


def _workers(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"bad number of workers {text!r}: expected 0 or more")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import ServerConfig

    d = ServerConfig()
    p.add_argument(
        "service",
        nargs="?",
        default=None,
        help="built-in name (see `sockserve services`) or module:function, imported from "
        "--app-dir (default: timestamp)",
    )
    p.add_argument(
        "-l",
        "--listen",
        action="append",
        metavar="URL",
        help="endpoint URL, repeatable (default: tcp://127.0.0.1:21567 and udp://127.0.0.1:21567)",
    )
    p.add_argument(
        "--framing",
        choices=("raw", "line", "length"),
        default=d.framing,
        help="stream framing (default raw: each chunk received is one request)",
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-message",
        type=_size,
        default=d.max_message,
        metavar="BYTES",
        help="largest request; longer closes the connection (default 64K)",
    )
    g.add_argument(
        "--idle-timeout",
        type=_timeout,
        default=d.idle_timeout,
        metavar="SECONDS",
        help="close connections that complete no request for this long; 0 = never (default 300)",
    )
    g.add_argument(
        "--max-conns",
        type=int,
        default=None,
        metavar="N",
        help="stop accepting at N open connections, resume when one closes (default: no limit)",
    )
    g.add_argument(
        "--max-handshakes",
        type=int,
        default=d.max_handshakes,
        metavar="N",
        help="TLS handshakes in progress per listener; past it the oldest is dropped "
        "(default 256; 0 = no cap)",
    )
    g.add_argument(
        "--backlog", type=int, default=d.backlog, metavar="N", help="listen backlog (default 65535)"
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, wait this long for in-flight requests (default 10)",
    )
    a = p.add_argument_group("access")
    a.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="only these clients (repeatable)",
    )
    a.add_argument(
        "--deny",
        action="append",
        default=[],
        metavar="CIDR",
        help="never these clients (repeatable)",
    )
    a.add_argument(
        "--unix-mode", metavar="OCTAL", help="permissions of Unix socket files, e.g. 660"
    )
    t = p.add_argument_group("TLS (tls:// endpoints)")
    t.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    t.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    t.add_argument(
        "--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA"
    )
    u = p.add_argument_group("UDP guards")
    u.add_argument(
        "--udp-rate",
        type=float,
        default=None,
        metavar="N",
        help="replies/s per source; 0 = off, the UDP loop budget too "
        "(default: 100 on non-loopback binds, off on loopback)",
    )
    u.add_argument(
        "--udp-min-source-port",
        type=int,
        default=d.udp_min_source_port,
        metavar="PORT",
        help="drop datagrams from source ports below this (default 1024; port 0 is always dropped)",
    )
    u.add_argument(
        "--udp-amplify",
        action="store_true",
        help="let amplifying services reply larger than the request to non-loopback sources",
    )
    c = p.add_argument_group("service options")
    c.add_argument(
        "--quotes",
        metavar="FILE",
        help="qotd: quotations to serve, separated by blank lines or '%%' lines (default: built-in)",
    )
    c.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="import module:function services (here and in --config) from DIR first "
        "(default: the current directory, as uvicorn does)",
    )
    dep = p.add_argument_group("deployment")
    dep.add_argument(
        "--config",
        metavar="FILE",
        help="serve the [[service]] tables of this TOML file instead of SERVICE/--listen; "
        "SIGHUP reloads it",
    )
    dep.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="N worker processes share each endpoint (SO_REUSEPORT); 0 = one per CPU (default 1)",
    )
    dep.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    x = p.add_argument_group("behind a proxy")
    x.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="stream connections must start with a PROXY v1/v2 header (HAProxy send-proxy); "
        "ctx.peer and the logs show the real client, --allow/--deny apply to it",
    )
    x.add_argument(
        "--proxy-from",
        action="append",
        default=[],
        metavar="CIDR",
        help="accept connections only from these proxies (repeatable; default: any)",
    )
    x.add_argument(
        "--proxy-header-timeout",
        type=float,
        default=d.proxy_header_timeout,
        metavar="SECONDS",
        help="close connections whose PROXY header is not complete by then (default 5)",
    )
    o = p.add_argument_group("logging and runtime")
    o.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")
    o.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="default info",
    )
    o.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="debug",
        help="same as --log-level debug",
    )
    o.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const="warning",
        help="same as --log-level warning",
    )
    o.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="no per-connection open/close lines (warnings and errors are still logged)",
    )
    o.add_argument(
        "--trace",
        action="store_true",
        help="log every request and reply as a hex dump (like socat -v), on every transport",
    )
    o.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (default: uvloop when installed)",
    )
    o.add_argument(
        "--engine",
        choices=("auto", "asyncio"),
        default=d.engine,
        help="auto (default): plain TCP/Unix request/reply and UDP on the epoll engine, the rest "
        "on asyncio transports; asyncio: everything on transports",
    )
    o.add_argument(
        "--busy-poll",
        type=int,
        default=d.busy_poll_us,
        metavar="USEC",
        help="after a batch of requests keep polling this long before sleeping; a client's next "
        "request usually arrives within it (default 50; 0 = off)",
    )


def build_config(args: argparse.Namespace) -> object:
    from ..config import ServerConfig, parse_mode, parse_network

    return ServerConfig(
        framing=args.framing,
        max_message=args.max_message,
        idle_timeout=args.idle_timeout,
        max_conns=args.max_conns,
        backlog=args.backlog,
        max_handshakes=args.max_handshakes,
        drain_timeout=args.drain_timeout,
        allow=tuple(parse_network(c) for c in args.allow),
        deny=tuple(parse_network(c) for c in args.deny),
        unix_mode=parse_mode(args.unix_mode) if args.unix_mode else None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        udp_rate=args.udp_rate,
        udp_min_source_port=args.udp_min_source_port,
        udp_amplify=args.udp_amplify,
        proxy_protocol=args.proxy_protocol,
        proxy_from=tuple(parse_network(c) for c in args.proxy_from),
        proxy_header_timeout=args.proxy_header_timeout,
        service_options=_service_options(args),
        engine=args.engine,
        busy_poll_us=args.busy_poll,
        trace=args.trace,
    )


def _service_options(args: argparse.Namespace) -> dict[str, object]:
    """Options only some services take; the service's ``configure`` checks them."""
    options: dict[str, object] = {}
    if getattr(args, "quotes", None) is not None:
        options["quotes"] = args.quotes
    return options


def run(args: argparse.Namespace) -> int:
    from ..deploy.activation import listen_fds
    from ..deploy.app import AppSpec
    from ..deploy.runner import make_runner
    from ..logs import configure_logging

    if args.config and (args.service is not None or args.listen):
        given = " and ".join(
            w for w, on in (("SERVICE", args.service is not None), ("--listen", args.listen)) if on
        )
        print(
            f"sockserve serve: {given} cannot be combined with --config {args.config}: "
            "the file names the services and their endpoints",
            file=sys.stderr,
        )
        return EXIT_USAGE
    _add_app_dir(args.app_dir)
    configure_logging(args.log_format, args.log_level, args.access_log)
    try:
        if args.metrics is not None:  # checked now, not after the endpoints are bound
            from ..deploy.metrics import parse_listen

            parse_listen(args.metrics)
        spec = AppSpec(
            service=args.service or "timestamp",
            urls=tuple(args.listen or ()),
            config=build_config(args),  # type: ignore[arg-type]
            config_file=args.config,
            metrics=args.metrics,
            workers=args.workers,
            loop=args.loop,
            log_format=args.log_format,
            log_level=args.log_level,
            access_log=args.access_log,
        )
        runner = make_runner(spec, listen_fds())
    except (ConfigError, EndpointError, ServiceError) as exc:
        print(f"sockserve serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return runner.run()
    except SockserveError as exc:
        print(f"sockserve serve: {exc}", file=sys.stderr)
        # Settings found wrong only at start (a TLS cert that does not load) are usage errors.
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAIL
    except ImportError as exc:
        print(f"sockserve serve: {exc}", file=sys.stderr)
        return EXIT_FAIL


def _add_app_dir(app_dir: str) -> None:
    """Put ``app_dir`` first on the import path, as uvicorn's ``--app-dir`` does.

    The ``sockserve`` script's own directory is what Python puts there, not the
    current one, so without this ``sockserve serve upper:upper`` could not import
    the upper.py beside the user. Absolute, so workers (which copy sys.path) agree.
    """
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
