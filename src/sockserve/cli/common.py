"""Helpers shared by the client subcommands: options, one-line errors and exit codes."""

from __future__ import annotations

import sys

from ..errors import (
    ClientError,
    ConnectError,
    ConnectionClosed,
    RequestTimeout,
    RequestTooLarge,
    SockserveError,
)
from .exits import EXIT_CLOSED, EXIT_CONNECT, EXIT_FAIL, EXIT_TIMEOUT, EXIT_USAGE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any


def fail(prog: str, message: str, code: int) -> int:
    """One line on stderr (if there is a stderr to write to) and the exit code."""
    err = sys.stderr
    if err is not None:
        try:  # noqa: SIM105 - contextlib would cost the one-shot call its import
            print(f"sockserve {prog}: {message}", file=err, flush=True)
        except (OSError, ValueError):
            pass  # stderr closed or full: the exit code still says it
    return code


def silence_stdout() -> None:
    """Point fd 1 at /dev/null after a write to it failed (closed pipe, full disk).

    Without this the interpreter's final flush of sys.stdout fails again and
    prints "Exception ignored ... BrokenPipeError" on the way out.
    """
    import os

    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.close(fd)
    except OSError:
        pass


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def exit_code(exc: SockserveError) -> int:
    """The exit code for a library error: what kind of failure, not which exception class.

    ConnectError is tested before RequestTimeout: a connect that times out is "cannot
    connect" (3), whatever else it also is.
    """
    if isinstance(exc, RequestTooLarge):
        return EXIT_USAGE
    if isinstance(exc, ConnectError):
        return EXIT_CONNECT
    if isinstance(exc, RequestTimeout):
        return EXIT_TIMEOUT
    if isinstance(exc, ConnectionClosed):
        return EXIT_CLOSED
    if isinstance(exc, ClientError):
        return EXIT_FAIL
    return EXIT_USAGE


#: The client options, written once: argparse is built from this table, and so is the
#: argparse-free fast path of ``sockserve call``. (flag, dest, type, default, help);
#: type None marks a flag without a value.
CLIENT_OPTIONS: tuple[tuple[str, str, Callable[[str], object] | None, object, str], ...] = (
    ("--framing", "framing", str, "raw", "stream framing: raw, line or length (default raw)"),
    (
        "--timeout",
        "timeout",
        float,
        5.0,
        "deadline in seconds for each request: connect, send and the whole reply "
        "(default 5; 0 = none)",
    ),
    (
        "--max-message",
        "max_message",
        int,
        64 * 1024,
        "largest reply accepted, datagrams included (bytes, default 65536)",
    ),
    ("--tls-ca", "tls_ca", str, None, "CA file to verify a tls:// server (default: system CAs)"),
    ("--tls-cert", "tls_cert", str, None, "client certificate for mutual TLS"),
    ("--tls-key", "tls_key", str, None, "key of the client certificate"),
    ("--tls-insecure", "tls_insecure", None, False, "do not verify the server certificate"),
    (
        "--server-name",
        "server_name",
        str,
        None,
        "TLS server name to verify (default: the URL host)",
    ),
)
_FRAMINGS = ("raw", "line", "length")


#: Exit codes of the client commands, for their --help.
EXIT_CODES_HELP = """exit codes:
  0  every request answered
  1  runtime failure (a reply longer than --max-message, output not writable)
  2  usage error: bad URL or option, missing TLS file, a request too large to send
  3  cannot connect (refused, unreachable, no such socket file, TLS handshake,
     or no connection within --timeout)
  4  timed out: connected, but no complete reply within --timeout
  5  the server closed the connection before the reply was complete
  130  interrupted (Ctrl-C)"""


def help_epilog(p: argparse.ArgumentParser, examples: str, codes: str = EXIT_CODES_HELP) -> None:
    """End ``--help`` with examples and exit codes, laid out as written."""
    import argparse

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = f"examples:\n{examples}\n\n{codes}"


def add_client_arguments(
    p: argparse.ArgumentParser,
    extra: tuple[tuple[str, str, Callable[[str], object] | None, object, str], ...] = (),
) -> None:
    p.add_argument(
        "url", metavar="URL", help="endpoint, e.g. tcp://127.0.0.1:21567, udp://..., unix:///path"
    )
    for flag, dest, typ, default, help_text in CLIENT_OPTIONS + extra:
        if typ is None:
            p.add_argument(flag, dest=dest, action="store_true", help=help_text)
        elif dest == "framing":
            p.add_argument(flag, dest=dest, choices=_FRAMINGS, default=default, help=help_text)
        else:
            p.add_argument(flag, dest=dest, type=typ, default=default, help=help_text)


class Args:
    """A plain namespace for the fast path (``argparse.Namespace`` without argparse)."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...


def fast_parse_client(
    argv: list[str],
    positional: str | None,
    extra: tuple[tuple[str, str, Callable[[str], object] | None, object, str], ...] = (),
) -> Args | None:
    """Parse ``URL [options] [POSITIONAL...]`` from CLIENT_OPTIONS (+ ``extra``) without argparse.

    Returns None for anything it does not handle plainly (help, unknown or bad
    options, ``--``, a missing URL): argparse then parses it and words the error.
    """
    table = CLIENT_OPTIONS + extra
    values: dict[str, object] = {dest: default for _, dest, _, default, _ in table}
    by_flag = {flag: (dest, typ) for flag, dest, typ, _, _ in table}
    words: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            words.append(arg)
            continue
        flag, eq, inline = arg.partition("=")
        if flag not in by_flag:
            return None
        dest, typ = by_flag[flag]
        if typ is None:
            if eq:
                return None
            values[dest] = True
            continue
        if not eq:
            if i >= len(argv):
                return None
            inline = argv[i]
            i += 1
        try:
            values[dest] = typ(inline)
        except Exception:  # ValueError, argparse.ArgumentTypeError: argparse words it
            return None
    if not words or values["framing"] not in _FRAMINGS:
        return None
    if positional is None and len(words) > 1:
        return None
    values["url"] = words[0]
    if positional is not None:
        values[positional] = words[1:]
    return Args(**values)


def client_options(args: object) -> dict[str, object]:
    timeout = args.timeout  # type: ignore[attr-defined]
    return {
        "framing": args.framing,  # type: ignore[attr-defined]
        "timeout": timeout if timeout and timeout > 0 else None,
        "max_message": args.max_message,  # type: ignore[attr-defined]
        "tls_ca": args.tls_ca,  # type: ignore[attr-defined]
        "tls_cert": args.tls_cert,  # type: ignore[attr-defined]
        "tls_key": args.tls_key,  # type: ignore[attr-defined]
        "tls_verify": not args.tls_insecure,  # type: ignore[attr-defined]
        "server_hostname": args.server_name,  # type: ignore[attr-defined]
        "reply_size": getattr(args, "reply_size", None),
    }


__all__ = [
    "CLIENT_OPTIONS",
    "EXIT_FAIL",
    "EXIT_USAGE",
    "add_client_arguments",
    "client_options",
    "exit_code",
    "fail",
    "fast_parse_client",
    "help_epilog",
    "positive_int",
    "silence_stdout",
]
