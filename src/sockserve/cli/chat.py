"""``sockserve chat URL``: the textbook interactive client; an empty line or EOF quits.

On a terminal it prompts ``> `` and edits lines with readline (arrows, history
for the session, Ctrl-R), as Python's own REPL does. From a pipe it prints only
the replies: a prompt in a pipe is noise for whoever reads it. Ctrl-C exits 130,
like any shell command interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from ..client.blocking import Client
from ..errors import SockserveError
from .common import (
    EXIT_CODES_HELP,
    add_client_arguments,
    client_options,
    exit_code,
    fail,
    help_epilog,
    silence_stdout,
)
from .exits import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

EXAMPLES = """\
  sockserve chat tcp://127.0.0.1:21567                 # type requests, read replies
  sockserve chat --framing line unix:///run/app.sock
  printf 'one\\ntwo\\n' | sockserve chat udp://127.0.0.1:21567   # no prompt in a pipe"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_client_arguments(p)
    help_epilog(p, EXAMPLES, EXIT_CODES_HELP)


def _enable_line_editing() -> None:
    """Load readline, which gives input() line editing and history; absent on some builds."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - imported for its effect on input()


def run(args: argparse.Namespace) -> int:
    try:
        client = Client(args.url, **client_options(args))  # type: ignore[arg-type]
    except SockserveError as exc:
        return fail("chat", str(exc), EXIT_USAGE)
    if sys.stdin is None or sys.stdout is None:
        return fail("chat", "standard input or output is closed", EXIT_USAGE)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        _enable_line_editing()
    out = sys.stdout.buffer
    try:
        with client:
            while True:
                if interactive:
                    try:
                        line = input("> ")
                    except EOFError:
                        print()
                        break
                    data = line.encode(errors="surrogateescape")
                else:
                    raw = sys.stdin.buffer.readline()
                    if not raw:
                        break
                    data = raw.rstrip(b"\r\n")
                if not data:
                    break
                reply = client.request(data)
                out.write(reply.rstrip(b"\n") + b"\n")
                out.flush()
    except SockserveError as exc:
        return fail("chat", str(exc), exit_code(exc))
    except KeyboardInterrupt:
        if interactive:
            print()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        silence_stdout()
    except OSError as exc:
        silence_stdout()
        return fail("chat", f"cannot write the reply: {exc.strerror or exc}", EXIT_FAIL)
    return EXIT_OK
