"""Helpers shared by the client subcommands: options, one-line errors and exit codes."""

from __future__ import annotations

import sys

from ..errors import ClientError, ConnectError, ConnectionClosed, RequestTimeout, SockserveError
from .main import EXIT_CLOSED, EXIT_CONNECT, EXIT_FAIL, EXIT_TIMEOUT, EXIT_USAGE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import argparse
    from typing import Any


def fail(prog: str, message: str, code: int) -> int:
    print(f"sockserve {prog}: {message}", file=sys.stderr)
    return code


def exit_code(exc: SockserveError) -> int:
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
CLIENT_OPTIONS: tuple[tuple[str, str, type | None, object, str], ...] = (
    ("--framing", "framing", str, "raw", "stream framing: raw, line or length (default raw)"),
    ("--timeout", "timeout", float, 5.0, "seconds to wait for each reply (default 5; 0 = forever)"),
    ("--max-message", "max_message", int, 64 * 1024, "largest reply accepted (bytes)"),
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


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "url", metavar="URL", help="endpoint, e.g. tcp://127.0.0.1:21567, udp://..., unix:///path"
    )
    for flag, dest, typ, default, help_text in CLIENT_OPTIONS:
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


def fast_parse_client(argv: list[str], positional: str | None) -> Args | None:
    """Parse ``URL [options] [POSITIONAL...]`` from CLIENT_OPTIONS without argparse.

    Returns None for anything it does not handle plainly (help, unknown or bad
    options, ``--``, a missing URL): argparse then parses it and words the error.
    """
    values: dict[str, object] = {dest: default for _, dest, _, default, _ in CLIENT_OPTIONS}
    by_flag = {flag: (dest, typ) for flag, dest, typ, _, _ in CLIENT_OPTIONS}
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
        except ValueError:
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
]
