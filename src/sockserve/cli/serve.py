"""``sockserve serve [SERVICE] [--listen URL]...``: parse options into a config, run the server.

The server settings' options are built from their declaration (:mod:`sockserve.settings`),
the one place their names, defaults and help are written; only the CLI turns library
errors into one-line messages and exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, EndpointError, ServiceError, SockserveError
from .main import EXIT_FAIL, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..deploy.activation import InheritedSocket
    from ..deploy.plan import AppSpec

EPILOG = """\
examples:
  sockserve serve                                   # timestamp, TCP+UDP 127.0.0.1:21567
  sockserve serve upper:upper -l tcp://127.0.0.1:9000 --framing line   # upper.py in .
  sockserve serve echo -l tcp://*:2007 -l udp://*:2007    # IPv4 and IPv6 (dual stack)
  sockserve serve -l unix:///tmp/ts.sock --trace    # hex dump of every request/reply
  sockserve serve --config services.toml --workers 4 --metrics 127.0.0.1:9100
  sockserve serve --config services.toml --check    # validate only, bind nothing

exit codes:
  0  stopped by SIGTERM/SIGINT after draining (--check: the configuration is good)
  1  forced exit (a second SIGINT, drain timeout) or a runtime failure
  2  usage error: bad option, URL, service, handler signature or config file
"""


def _workers(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"bad number of workers {text!r}: expected 0 or more")
    return int(text)


#: The ``--help`` sections, in order; settings name theirs in sockserve.settings.
GROUPS = (
    "limits",
    "access",
    "TLS (tls:// endpoints)",
    "UDP guards",
    "service options",
    "deployment",
    "behind a proxy",
    "logging and runtime",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..settings import SETTINGS

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
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    _add_own_options(groups)
    # Every setting, from its declaration. default=None means "not given": ServerConfig's
    # own default applies, and a config file's table can tell it from a given value.
    for s in SETTINGS:
        target = p if s.group == "framing" else groups[s.group]
        kw: dict[str, Any] = {"dest": s.name, "default": None, "help": s.help}
        if s.kind.flag:
            kw.update(action="store_const", const=True)
        else:
            kw.update(metavar=s.metavar, action="append" if s.kind.repeat else "store")
        if s.choices:
            kw["choices"] = s.choices
        target.add_argument(*s.options, **kw)


def _add_own_options(groups: dict[str, argparse._ArgumentGroup]) -> None:
    """The options that are not server settings: how to run, not how to serve."""
    c = groups["service options"]
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
    dep = groups["deployment"]
    dep.add_argument(
        "--config",
        metavar="FILE",
        help="serve the [[service]] tables of this TOML file instead of SERVICE/--listen; "
        "SIGHUP reloads it",
    )
    dep.add_argument(
        "--check",
        action="store_true",
        help="check the options or --config file (keys, types, ranges, URLs, service imports, "
        "TLS files) and exit: 0 with one line if good, 2 naming the mistake; binds nothing",
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
    add_runtime_options(groups["logging and runtime"])


def add_runtime_options(o: argparse._ArgumentGroup) -> None:
    """--log-format, --log-level, -v, -q, --no-access-log, --loop (serve's and relay's)."""
    o.add_argument("--log-format", choices=("text", "json"), default="text", help="log line format")
    o.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="default info",
    )
    for flag, level in (("verbose", "debug"), ("quiet", "warning")):
        o.add_argument(
            f"-{flag[0]}",
            f"--{flag}",
            dest="log_level",
            action="store_const",
            const=level,
            help=f"same as --log-level {level}",
        )
    o.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="no per-connection open/close lines (warnings and errors are still logged)",
    )
    o.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (default: uvloop when installed)",
    )


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, converted; ConfigError naming the option."""
    from ..errors import ConfigError
    from ..settings import SETTINGS

    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = getattr(args, s.name, None)
        if raw is None:
            continue
        try:
            values[s.name] = raw if s.kind.flag else s.kind.cli(raw)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{s.option}: {exc}") from None
    if getattr(args, "quotes", None) is not None:  # qotd's option, spelled as before
        values["service_options"] = {**values.get("service_options", {}), "quotes": args.quotes}
    return values


def build_config(args: argparse.Namespace) -> ServerConfig:
    """The command line's ServerConfig; a ConfigError names the option it blames."""
    from ..config import ServerConfig, blame
    from ..errors import ConfigError
    from ..settings import BY_NAME

    values = given_settings(args)
    try:
        return ServerConfig(**values)
    except ConfigError as exc:
        culprit = blame(ServerConfig(), values)
        if culprit is None:
            raise
        raise ConfigError(f"{exc} (option {BY_NAME[culprit].option})") from None


def run(args: argparse.Namespace) -> int:
    from ..deploy.activation import listen_fds
    from ..deploy.plan import AppSpec
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
            config=build_config(args),
            config_file=args.config,
            **{name: getattr(args, name) for name in _RUN_OPTIONS},
        )
        if args.check:
            return _check(spec, listen_fds())
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


#: AppSpec fields that are the options of the same name, as given.
_RUN_OPTIONS = ("metrics", "workers", "loop", "log_format", "log_level", "access_log")


def _check(spec: AppSpec, inherited: list[InheritedSocket]) -> int:
    """``--check``: as ``nginx -t``, say whether serving would start, without binding."""
    from ..deploy.plan import check

    print(f"sockserve serve: {check(spec, inherited)}")
    return EXIT_OK


def _add_app_dir(app_dir: str) -> None:
    """Put ``app_dir`` first on the import path, as uvicorn's ``--app-dir`` does.

    The ``sockserve`` script's own directory is what Python puts there, not the
    current one, so without this ``sockserve serve upper:upper`` could not import
    the upper.py beside the user. Absolute, so workers (which copy sys.path) agree.
    """
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
