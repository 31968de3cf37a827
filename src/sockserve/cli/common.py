"""Helpers shared by the client subcommands: one-line errors and exit codes."""

from __future__ import annotations

import sys

from ..errors import ClientError, ConnectError, ConnectionClosed, RequestTimeout, SockserveError
from .main import EXIT_CLOSED, EXIT_CONNECT, EXIT_FAIL, EXIT_TIMEOUT, EXIT_USAGE


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


def add_client_arguments(p: object) -> None:
    import argparse

    assert isinstance(p, argparse.ArgumentParser)
    p.add_argument(
        "url", metavar="URL", help="endpoint, e.g. tcp://127.0.0.1:21567, udp://..., unix:///path"
    )
    p.add_argument(
        "--framing",
        choices=("raw", "line", "length"),
        default="raw",
        help="stream framing (default raw)",
    )
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for each reply (default 5)"
    )
    p.add_argument(
        "--max-message", type=int, default=64 * 1024, help="largest reply accepted (bytes)"
    )
    p.add_argument("--tls-ca", help="CA file to verify a tls:// server (default: system CAs)")
    p.add_argument("--tls-cert", help="client certificate for mutual TLS")
    p.add_argument("--tls-key", help="key of the client certificate")
    p.add_argument(
        "--tls-insecure", action="store_true", help="do not verify the server certificate"
    )
    p.add_argument("--server-name", help="TLS server name to verify (default: the URL host)")


def client_options(args: object) -> dict[str, object]:
    return {
        "framing": args.framing,  # type: ignore[attr-defined]
        "timeout": args.timeout if args.timeout and args.timeout > 0 else None,  # type: ignore[attr-defined]
        "max_message": args.max_message,  # type: ignore[attr-defined]
        "tls_ca": args.tls_ca,  # type: ignore[attr-defined]
        "tls_cert": args.tls_cert,  # type: ignore[attr-defined]
        "tls_key": args.tls_key,  # type: ignore[attr-defined]
        "tls_verify": not args.tls_insecure,  # type: ignore[attr-defined]
        "server_hostname": args.server_name,  # type: ignore[attr-defined]
    }


__all__ = ["EXIT_FAIL", "EXIT_USAGE", "add_client_arguments", "client_options", "exit_code", "fail"]
