"""``sockserve`` entry point: dispatch to a subcommand module, imported only when used.

Exit codes shared by every subcommand: 0 ok, 1 runtime failure, 2 usage error;
``call`` adds 3 (cannot connect), 4 (timed out) and 5 (closed early).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_TIMEOUT = 4
EXIT_CLOSED = 5

COMMANDS = {
    "serve": (
        "sockserve.cli.serve",
        "run a service (default: timestamp on TCP+UDP 127.0.0.1:21567)",
    ),
    "call": ("sockserve.cli.call", "send requests to an endpoint and print the replies"),
    "chat": ("sockserve.cli.chat", "interactive client: each line you type is a request"),
    "services": ("sockserve.cli.services", "list the built-in services"),
    "bench": ("sockserve.cli.bench", "load-test an endpoint"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits 2 with one line of usage error (its default), never a traceback."""


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = ArgumentParser(
        prog="sockserve",
        description="Serve, call and load-test request/response services over TCP, UDP and Unix sockets.",
    )
    parser.add_argument("--version", action="version", version=f"sockserve {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Fast path: build only the parser that is needed, so `sockserve call` starts quickly.
    if args_list and args_list[0] in COMMANDS:
        import importlib

        name = args_list[0]
        module, help_text = COMMANDS[name]
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            print(f"sockserve {name}: unavailable: {exc}", file=sys.stderr)
            return EXIT_FAIL
        p = ArgumentParser(prog=f"sockserve {name}", description=help_text)
        mod.add_arguments(p)
        args = p.parse_intermixed_args(args_list[1:])
        try:
            return int(mod.run(args))
        except KeyboardInterrupt:
            return 130
    parser = build_parser()
    args = parser.parse_args(args_list)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    return int(args._module.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
