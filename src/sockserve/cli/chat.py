"""``sockserve chat URL``: the textbook interactive client. Prompt ``> ``; empty line or EOF quits."""

from __future__ import annotations

import argparse
import sys

from ..client import Client
from ..errors import SockserveError
from .common import add_client_arguments, client_options, exit_code, fail
from .main import EXIT_OK, EXIT_USAGE


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_client_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        client = Client(args.url, **client_options(args))  # type: ignore[arg-type]
    except SockserveError as exc:
        return fail("chat", str(exc), EXIT_USAGE)
    interactive = sys.stdin.isatty()
    try:
        with client:
            while True:
                if interactive:
                    try:
                        line = input("> ")
                    except EOFError:
                        print()
                        break
                    data = line.encode()
                else:
                    sys.stdout.write("> ")
                    sys.stdout.flush()
                    raw = sys.stdin.buffer.readline()
                    if not raw:
                        sys.stdout.write("\n")
                        break
                    data = raw.rstrip(b"\r\n")
                if not data:
                    break
                reply = client.request(data)
                sys.stdout.buffer.write(reply.rstrip(b"\n") + b"\n")
                sys.stdout.flush()
    except SockserveError as exc:
        return fail("chat", str(exc), exit_code(exc))
    except KeyboardInterrupt:
        print()
    return EXIT_OK
