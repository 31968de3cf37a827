"""``sockserve`` entry point: dispatch to a subcommand module, imported only when used.

Exit codes shared by every subcommand (:mod:`sockserve.cli.exits`): 0 ok, 1 runtime
failure, 2 usage error; ``call`` adds 3 (cannot connect, a connect timeout included),
4 (connected, no reply in time) and 5 (closed early).

``sockserve call`` must start about as fast as ``python -c pass``, so this module
imports nothing at the top (argparse alone costs ~4 ms), and a plain ``call``
command line is parsed without argparse (see ``common.fast_parse``); anything
unusual, such as ``--help`` or a bad option, goes to argparse for its messages.
"""

from __future__ import annotations

import sys

from .exits import (  # re-exported: the subcommands imported them from here
    EXIT_CLOSED,
    EXIT_CONNECT,
    EXIT_FAIL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any


__all__ = [
    "EXIT_CLOSED",
    "EXIT_CONNECT",
    "EXIT_FAIL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "build_parser",
    "exit_with",
    "main",
]

COMMANDS = {
    "serve": (
        "sockserve.cli.serve",
        "run a service (default: timestamp on TCP+UDP 127.0.0.1:21567)",
    ),
    "call": ("sockserve.cli.call", "send requests to an endpoint and print the replies"),
    "chat": ("sockserve.cli.chat", "interactive client: each line you type is a request"),
    "services": ("sockserve.cli.services", "list the built-in services"),
    "relay": (
        "sockserve.cli.relay",
        "join every connection on LISTEN to TARGET (socat/toxiproxy-style relay)",
    ),
    "bench": ("sockserve.cli.bench", "load-test an endpoint"),
    "completion": (
        "sockserve.cli.completion",
        "print a shell completion script (bash, zsh or fish)",
    ),
}

#: The end of ``sockserve --help``. Each command module may have its own ``EPILOG``.
EPILOG = """\
examples:
  sockserve serve                                  # timestamp on TCP+UDP 127.0.0.1:21567
  sockserve call tcp://127.0.0.1:21567 hello       # one request, print the reply
  sockserve services                               # the built-in services
  sockserve COMMAND --help                         # a command's options

exit codes:
  0 ok, 1 runtime failure, 2 usage error; call, chat and bench add 3 cannot connect
  (refused, unreachable, TLS failure, or no connection within --timeout), 4 connected
  but no reply within --timeout, 5 closed early
"""


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand (for ``sockserve --help``)."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser(
        prog="sockserve",
        description=(
            "Serve, call and load-test request/response services over TCP, UDP and Unix sockets."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sockserve {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        p = sub.add_parser(name, help=help_text, **_parser_options(mod, help_text))
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def _parser_options(mod: object, help_text: str) -> dict[str, Any]:
    """A command's parser settings: its description and, kept as written, its ``EPILOG``."""
    import argparse

    return {
        "description": help_text,
        "epilog": getattr(mod, "EPILOG", None),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def _version() -> str:
    """The version, and whether the C speedups are in use."""
    from .. import __version__
    from .._engine.fastio import SPEEDUPS_STATE

    return f"{__version__} (C speedups: {SPEEDUPS_STATE})"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] in (["serve"], ["relay"]):
        from .._sighup import hold, hold_stop

        hold()  # first: a reload signal (logrotate, systemctl reload) must not kill it
        if args_list[0] == "serve":
            hold_stop()  # and a SIGTERM then is a graceful stop once it can drain
    try:
        if args_list and args_list[0] in COMMANDS:
            return _run_command(args_list[0], args_list[1:])
        parser = build_parser()
        args = parser.parse_args(args_list)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USAGE
        return int(args._module.run(args))
    except KeyboardInterrupt:  # Ctrl-C while importing or starting: no traceback
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `| head` left before the output ended: nothing left to say
        from .common import silence_stdout

        silence_stdout()
        return EXIT_OK


def _run_command(name: str, argv: list[str]) -> int:
    """Build only the parser that is needed, so a subcommand starts quickly."""
    module, help_text = COMMANDS[name]
    try:
        # __import__ rather than importlib.import_module: importlib pulls in warnings.
        __import__(module)
        mod = sys.modules[module]
    except ImportError as exc:
        print(f"sockserve {name}: unavailable: {exc}", file=sys.stderr)
        return EXIT_FAIL
    fast = getattr(mod, "fast_parse", None)
    args = fast(argv) if fast is not None else None
    if args is None:
        import argparse

        p = argparse.ArgumentParser(prog=f"sockserve {name}", **_parser_options(mod, help_text))
        mod.add_arguments(p)
        args = p.parse_intermixed_args(argv)
    try:
        return int(mod.run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def exit_with(code: int) -> None:
    """Exit with ``code``. After a one-shot ``call`` skip the interpreter's teardown.

    Freeing every object at exit takes ~1.5 ms, more than a whole ``sockserve call``
    spends on its own work; its output is flushed here first and it registers no
    exit handlers, so ``os._exit`` loses nothing. Other commands exit normally; a
    server that has stopped ignores SIGTERM/SIGINT from here on, or the interpreter's
    teardown (which restores the default, fatal actions) would let a late second
    SIGTERM turn its status into death by signal.
    """
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    if len(sys.argv) > 1 and sys.argv[1] == "call":
        import os

        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass  # a closed pipe, stream or fd (sys.stdout None), a full disk: nothing to add
        else:
            os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    exit_with(main())
