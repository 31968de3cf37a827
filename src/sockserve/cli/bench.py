"""``sockserve bench URL``: load-test an endpoint and report requests/s and latency.

Only parses options into a :class:`~sockserve.bench.LoadSpec` and hands it to
the engine; the engine raises typed errors and this module turns them into one
line on stderr and an exit code: 2 bad URL or options, 3 cannot connect,
4/5 the probe request timed out / was cut off (as ``call``), 1 the run was cut
short (no connection could be reopened), 130 Ctrl-C (after the report of what
was measured so far). Errors during a run are data, not failures: they are
counted in the report and the exit code stays 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable
from typing import TypeVar

from ..errors import ClientError, ConnectError, EndpointError, SockserveError
from .common import add_client_arguments, exit_code, fail, help_epilog, silence_stdout
from .main import EXIT_CONNECT, EXIT_FAIL, EXIT_OK, EXIT_USAGE

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

EXAMPLES = """\
  sockserve bench tcp://127.0.0.1:21567 -c 50 -d 10               # throughput, closed loop
  sockserve bench tcp://127.0.0.1:21567 -c 50 --rate 20000 -d 30  # latency at a fixed load
  sockserve bench udp://127.0.0.1:21567 -n 100000 --json          # for scripts"""

EXIT_CODES = """exit codes:
  0  the run completed (errors during it are counted in the report)
  1  the run was cut short (no connection could be reopened), or output not writable
  2  usage error: bad URL or option, missing TLS file
  3  cannot connect
  4  the probe request timed out (no reply within --timeout)
  5  the probe request was cut off (the server closed the connection)
  130  interrupted (Ctrl-C): the report covers what was measured until then"""

N = TypeVar("N", int, float)

#: Default request: 64 bytes, the size the issue's workloads use.
DEFAULT_SIZE = 64
DEFAULT_DURATION = 10.0


def _checked(
    convert: Callable[[str], N], noun: str, ok: Callable[[N], bool], rule: str
) -> Callable[[str], N]:
    """An argparse ``type``: ``convert`` the text, then refuse what ``ok`` rejects, saying ``rule``."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, not {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text!r}")
        return value

    return parse


_positive_int = _checked(int, "a whole number", lambda v: v >= 1, "at least 1")
# NaN fails both comparisons; infinity would make a run, or a sleep, that never ends.
_positive_float = _checked(float, "a number", lambda v: 0 < v < math.inf, "a positive number")
_non_negative_float = _checked(float, "a number", lambda v: 0 <= v < math.inf, "0 or more")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_client_arguments(p)
    p.add_argument(
        "-c",
        "--conns",
        type=_positive_int,
        default=50,
        metavar="N",
        help="connections (UDP: client sockets) kept open (default 50)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "-d",
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help=f"measure for this long (default {DEFAULT_DURATION:g})",
    )
    length.add_argument(
        "-n",
        "--requests",
        type=_positive_int,
        metavar="N",
        help="stop after N requests have completed",
    )
    body = p.add_mutually_exclusive_group()
    body.add_argument(
        "-s",
        "--size",
        type=_positive_int,
        metavar="BYTES",
        help=f"request payload size (default {DEFAULT_SIZE}); framing bytes come on top",
    )
    body.add_argument("--message", metavar="TEXT", help="send this text as every request")
    p.add_argument(
        "--pipeline",
        type=_positive_int,
        default=1,
        metavar="N",
        help="requests in flight per connection (default 1; raw framing needs --reply-size)",
    )
    p.add_argument(
        "--rate",
        type=_positive_float,
        metavar="R",
        help="open loop: send R requests/s in total on schedule, latency measured from "
        "when each was due (no coordinated omission)",
    )
    p.add_argument(
        "--procs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="load processes, so the generator is not the bottleneck (default 1)",
    )
    p.add_argument(
        "--warmup",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="run this long before measuring (default 0)",
    )
    p.add_argument(
        "--reply-size",
        type=_positive_int,
        metavar="BYTES",
        help="raw framing: a reply is this many bytes (default: each chunk received is one reply)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the report"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no live progress line")
    help_epilog(p, EXAMPLES, EXIT_CODES)


def _spec(args: argparse.Namespace) -> object:
    from ..bench import LoadSpec, TlsOptions
    from ..client.blocking import check_tls_files
    from ..endpoints import parse_endpoint
    from ..framing import DEFAULT_MAX_MESSAGE

    endpoint = parse_endpoint(args.url)
    check_tls_files(args.tls_ca, args.tls_cert, args.tls_key)  # TLSFileError: a ValueError
    if args.message is not None:
        payload = args.message.encode()
        if not payload:
            raise ValueError("--message must not be empty")
    else:
        size = args.size or DEFAULT_SIZE
        payload = bytes(0x61 + i % 26 for i in range(size))  # a..z, like echobench
    if endpoint.is_stream and args.framing == "line" and b"\n" in payload:
        raise ValueError("--message must not contain a newline with --framing line")
    if (
        endpoint.is_stream
        and args.framing == "raw"
        and args.pipeline > 1
        and args.reply_size is None
    ):
        raise ValueError(
            "--pipeline with raw framing needs --reply-size: raw replies have no boundaries"
        )
    if not endpoint.is_stream and len(payload) > 65507:
        raise ValueError(f"a {len(payload)}-byte request does not fit in one datagram")
    if args.procs > args.conns:
        raise ValueError(f"--procs {args.procs} needs at least as many connections (-c)")
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    return LoadSpec(
        endpoint=endpoint,
        payload=payload,
        conns=args.conns,
        duration=None if args.requests else (args.duration or DEFAULT_DURATION),
        requests=args.requests,
        pipeline=args.pipeline,
        rate=args.rate,
        framing=args.framing,
        reply_size=args.reply_size,
        timeout=timeout,
        warmup=args.warmup,
        max_message=max(args.max_message, DEFAULT_MAX_MESSAGE),
        tls=TlsOptions(
            ca=args.tls_ca,
            cert=args.tls_cert,
            key=args.tls_key,
            verify=not args.tls_insecure,
            server_hostname=args.server_name,
        ),
    )


def run(args: argparse.Namespace) -> int:
    from ..bench import LoadSpec, render, run_load, run_procs, summary
    from ..bench.report import ProgressLine

    try:
        spec = _spec(args)
    except (EndpointError, ValueError) as exc:
        return fail("bench", str(exc), EXIT_USAGE)
    assert isinstance(spec, LoadSpec)
    progress = None if args.quiet or sys.stderr is None else ProgressLine()
    try:
        if args.procs == 1:
            result = run_load(spec, progress)
        else:
            result = run_procs(spec, args.procs, progress)
    except ConnectError as exc:
        return fail("bench", f"cannot connect: {exc}", EXIT_CONNECT)
    except ClientError as exc:
        return fail("bench", str(exc), exit_code(exc))
    except SockserveError as exc:
        return fail("bench", str(exc), EXIT_USAGE)
    except OSError as exc:
        return fail("bench", f"{spec.endpoint}: {exc.strerror or exc}", EXIT_FAIL)
    finally:
        if progress is not None:
            with contextlib.suppress(OSError):  # stderr gone: the report still goes to stdout
                progress.finish()
    if args.json:
        report = json.dumps(summary(result, spec, args.procs))
    else:
        enc = (getattr(sys.stdout, "encoding", None) or "").lower()
        report = render(result, spec, args.procs, unicode=enc.startswith("utf"))
    code = EXIT_INTERRUPTED if result.interrupted else EXIT_FAIL if result.aborted else EXIT_OK
    if sys.stdout is None:
        return fail("bench", "standard output is closed: no report", EXIT_FAIL)
    try:
        print(report, flush=True)
    except BrokenPipeError:
        silence_stdout()  # `| head`, `| true`: the reader left; the report was not wanted
    except OSError as exc:
        silence_stdout()
        return fail("bench", f"cannot write the report: {exc.strerror or exc}", EXIT_FAIL)
    return code
