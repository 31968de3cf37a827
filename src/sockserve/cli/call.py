"""``sockserve call URL [TEXT...]``: one request from TEXT, or one per stdin line; print replies.

Imports only the blocking client (no asyncio), so a one-shot call starts fast.
"""

from __future__ import annotations

import sys

from ..client import Client
from ..errors import EndpointError, SockserveError
from .common import Args, add_client_arguments, client_options, exit_code, fail, fast_parse_client
from .main import EXIT_OK, EXIT_USAGE

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_client_arguments(p)
    p.add_argument(
        "text",
        nargs="*",
        metavar="TEXT",
        help="the request (words joined by spaces); default: each stdin line",
    )


def fast_parse(argv: list[str]) -> Args | None:
    """Parse a plain call command line without argparse (None: let argparse do it)."""
    return fast_parse_client(argv, "text")


def run(args: argparse.Namespace | Args) -> int:
    try:
        client = Client(args.url, **client_options(args))  # type: ignore[arg-type]
    except (EndpointError, SockserveError) as exc:
        return fail("call", str(exc), EXIT_USAGE)
    out = sys.stdout.buffer
    try:
        with client:
            if args.text:
                requests = [" ".join(args.text).encode()]
                _answer(client, requests[0], out)
            else:
                for line in sys.stdin.buffer:
                    _answer(client, line.rstrip(b"\r\n"), out)
    except SockserveError as exc:
        out.flush()
        return fail("call", str(exc), exit_code(exc))
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK


def _answer(client: Client, request: bytes, out: object) -> None:
    reply = client.request(request)
    out.write(reply if reply.endswith(b"\n") else reply + b"\n")  # type: ignore[attr-defined]
    out.flush()  # type: ignore[attr-defined]
