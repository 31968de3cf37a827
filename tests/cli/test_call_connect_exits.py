"""``sockserve call``: a connect that times out exits 3 ("cannot connect"), not 4.

4 means connected but no complete reply within ``--timeout``; 3 means the server was
never reached, which is what a connect timeout is (a full accept queue, a host that
drops SYNs, a TLS handshake that never finishes). The help says which is which.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from support import run_cli

pytestmark = pytest.mark.timeout(60)


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("sockserve call: "), err
    return err


@contextmanager
def full_backlog() -> Iterator[int]:
    """A TCP listener with a full accept queue: a new SYN goes unanswered, connect() waits."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    filler = socket.create_connection(lst.getsockname(), timeout=5)
    try:
        yield int(lst.getsockname()[1])
    finally:
        filler.close()
        lst.close()


def test_connect_timeout_exits_3_naming_endpoint_and_timeout() -> None:
    """Mutation: the old RequestTimeout for a connect timeout exits 4."""
    with full_backlog() as port:
        proc = run_cli("call", "--timeout", "0.5", f"tcp://127.0.0.1:{port}", "x")
    assert proc.returncode == 3, proc.stderr
    err = one_line_error(proc)
    assert f"tcp://127.0.0.1:{port}: connect not done within 0.5s" in err, err


def test_tls_handshake_timeout_exits_3() -> None:
    with socket.socket() as silent:  # completes TCP in the kernel, never answers the hello
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"tls://127.0.0.1:{silent.getsockname()[1]}"
        proc = run_cli("call", "--timeout", "0.5", "--tls-insecure", url, "x")
    assert proc.returncode == 3, proc.stderr
    assert "connect and TLS handshake not done within 0.5s" in one_line_error(proc)


def test_connected_but_silent_still_exits_4() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        url = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        proc = run_cli("call", "--framing", "line", "--timeout", "0.5", url, "x")
    assert proc.returncode == 4, proc.stderr
    assert f"{url}: no reply within 0.5s" in one_line_error(proc)


@pytest.mark.parametrize("command", ["call", "chat"])
def test_help_says_a_connect_timeout_is_exit_3(command: str) -> None:
    out = run_cli(command, "--help").stdout.decode()
    codes = out[out.index("exit codes:") :]
    three = codes[codes.index("  3 ") : codes.index("  4 ")]
    assert "no connection within --timeout" in three, codes
    assert "connected, but no complete reply" in codes[codes.index("  4 ") :], codes
