"""``sockserve call URL [TEXT...]``: one request from TEXT, or one per stdin line; print replies.

Imports only the blocking client (no asyncio, argparse, json or re on the plain
path), so a one-shot call starts fast.

Where a reply ends is the client's rule (:mod:`sockserve.client`): with raw
framing each request has a connection of its own and its reply runs to the
server's close (printed as it arrives, whatever its size), unless
``--reply-size`` says how long every reply is; ``line``/``length`` framings
share one connection. Empty stdin lines are skipped with raw framing (an empty
raw message cannot be sent) and sent as requests with line/length framing.
"""

from __future__ import annotations

import os
import sys

from ..client.blocking import Client
from ..errors import SockserveError
from .common import (
    Args,
    add_client_arguments,
    client_options,
    exit_code,
    fail,
    fast_parse_client,
    help_epilog,
    positive_int,
    silence_stdout,
)
from .exits import EXIT_FAIL, EXIT_OK, EXIT_USAGE

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import BinaryIO

#: Options of ``call`` alone, in the CLIENT_OPTIONS format (flag, dest, type, default, help).
CALL_OPTIONS: tuple[tuple[str, str, Callable[[str], object] | None, object, str], ...] = (
    (
        "--reply-size",
        "reply_size",
        positive_int,
        None,
        "raw framing: every reply is exactly this many bytes, so several requests share "
        "one connection (default: a connection per request, the reply runs to its close)",
    ),
    ("--hex", "hex", None, False, "print each reply as a hex dump (offset, hex, ASCII, like xxd)"),
    (
        "--json",
        "json",
        None,
        False,
        'print one JSON object per reply: {"request", "reply", "latency_ms"}; a request or '
        'reply that is not UTF-8 comes as "request_base64"/"reply_base64" instead',
    ),
)

EXAMPLES = """\
  sockserve call tcp://127.0.0.1:21567 hello        # one request, print the reply
  printf 'a\\nb\\n' | sockserve call --framing line tcp://127.0.0.1:21567
  sockserve call --hex tcp://127.0.0.1:21568 x      # binary replies (the time service)
  sockserve call --json udp://127.0.0.1:21567 hi    # for scripts: request, reply, latency"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_client_arguments(p, CALL_OPTIONS)
    p.add_argument(
        "text",
        nargs="*",
        metavar="TEXT",
        help="the request (words joined by spaces, sent as their bytes); "
        "none: each stdin line is one request",
    )
    help_epilog(p, EXAMPLES)


def fast_parse(argv: list[str]) -> Args | None:
    """Parse a plain call command line without argparse (None: let argparse do it)."""
    return fast_parse_client(argv, "text", CALL_OPTIONS)


def run(args: argparse.Namespace | Args) -> int:
    if args.hex and args.json:
        return fail("call", "--hex and --json do not go together", EXIT_USAGE)
    if args.reply_size is not None and args.framing != "raw":
        return fail("call", "--reply-size is for --framing raw", EXIT_USAGE)
    try:
        client = Client(args.url, **client_options(args))  # type: ignore[arg-type]
    except SockserveError as exc:
        return fail("call", str(exc), EXIT_USAGE)
    stdout = sys.stdout
    if stdout is None:
        return fail("call", "standard output is closed", EXIT_FAIL)
    out: BinaryIO = stdout.buffer
    if args.text:
        # The words' own bytes: os.fsencode gives back what the shell passed, even bytes
        # that are not valid in the locale's encoding (b"\xff" arrives as "\udcff").
        requests: Iterable[bytes] = [os.fsencode(" ".join(args.text))]
    elif sys.stdin is None:
        return fail("call", "no TEXT given and standard input is closed", EXIT_USAGE)
    else:
        requests = _lines(sys.stdin.buffer, keep_empty=args.framing != "raw")
    answer = _answerer(client, out, args)
    try:
        with client:
            for request in requests:
                answer(request)
    except SockserveError as exc:
        try:
            out.flush()
        except OSError:
            silence_stdout()
        return fail("call", str(exc), exit_code(exc))
    except (OSError, OutputError) as exc:
        err = exc.error if isinstance(exc, OutputError) else exc
        silence_stdout()
        if isinstance(err, BrokenPipeError):
            return EXIT_OK  # the reader went away (`| head`): nothing left to say
        return fail("call", f"cannot write the reply: {err.strerror or err}", EXIT_FAIL)
    return EXIT_OK


class OutputError(Exception):
    """Writing a reply to stdout failed while the client was reading it (wraps the OSError)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator


def _lines(stream: BinaryIO, *, keep_empty: bool) -> Iterator[bytes]:
    """Each stdin line without its line end; empty ones only where the framing can send them."""
    for line in stream:
        line = line.rstrip(b"\r\n")
        if line or keep_empty:
            yield line


def _answerer(client: Client, out: BinaryIO, args: object) -> Callable[[bytes], None]:
    """The function that sends one request and prints its reply in the chosen form."""
    if getattr(args, "json", False):
        return _json_answerer(client, out)
    if getattr(args, "hex", False):

        def hex_answer(request: bytes) -> None:
            out.write(hexdump(client.request(request)))
            out.flush()

        return hex_answer

    def answer(request: bytes) -> None:
        last = b""  # the last byte printed: a reply gets a newline unless it ends with one

        def sink(chunk: bytes) -> None:
            nonlocal last
            try:
                out.write(chunk)
            except OSError as exc:  # not the connection's error: keep it apart from those
                raise OutputError(exc) from None
            last = chunk[-1:]

        reply = client.request(request, sink)
        if reply:
            out.write(reply)
            last = reply[-1:]
        if last != b"\n":
            out.write(b"\n")
        out.flush()

    return answer


def _json_answerer(client: Client, out: BinaryIO) -> Callable[[bytes], None]:
    import json
    import time

    def field(obj: dict[str, object], name: str, data: bytes) -> None:
        try:
            obj[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            obj[name + "_base64"] = base64.b64encode(data).decode("ascii")

    def answer(request: bytes) -> None:
        t0 = time.perf_counter()
        reply = client.request(request)
        latency = (time.perf_counter() - t0) * 1000
        obj: dict[str, object] = {}
        field(obj, "request", request)
        field(obj, "reply", reply)
        obj["latency_ms"] = round(latency, 3)
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    return answer


def hexdump(data: bytes) -> bytes:
    """``xxd``'s layout: offset, 16 bytes as 8 groups of 2, then the printable ASCII."""
    lines = []
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        groups = " ".join(row[i : i + 2].hex() for i in range(0, len(row), 2))
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{off:08x}: {groups:<39}  {text}\n")
    return "".join(lines).encode()
