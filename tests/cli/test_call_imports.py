"""What a one-shot ``sockserve call`` imports, pinned: start-up speed cannot silently regress.

``call`` must start about as fast as ``python -c pass``: it loads the blocking client
(``_socket`` only), never asyncio, typing (6 ms), dataclasses, argparse (4 ms), re, the
``socket`` module's Python layer (enum, selectors: 6 ms), ssl for a non-TLS URL, nor any
of the server side. Read from ``python -X importtime``, against a real server.
Mutation: ``import typing`` at the top of client/blocking.py turns this red.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from strict import require

from sockserve.server import ServerThread

pytestmark = pytest.mark.timeout(60)

#: Never on the plain call path, at any depth (the first dotted part of a module's name).
FORBIDDEN = {"asyncio", "typing", "dataclasses", "argparse", "re", "socket", "selectors", "ssl"}
FORBIDDEN_SOCKSERVE = ("sockserve.server", "sockserve._engine", "sockserve.deploy")
#: Interpreter settings that would import more at start-up than a user's plain run.
NOISY_ENV = ("PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONSTARTUP", "PYTHONPROFILEIMPORTTIME")


def imports(*args: str, stdin: bytes | None = None) -> tuple[set[str], bytes]:
    """The modules ``python -X importtime ARGS`` imported, and what it printed."""
    env = {k: v for k, v in os.environ.items() if k not in NOISY_ENV}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    names = set()
    for line in proc.stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    names.discard("imported package")  # the header line
    return names, proc.stdout


def test_the_interpreter_itself_imports_none_of_them() -> None:
    """Otherwise the pin below could not see them (a sitecustomize, a .pth file...)."""
    baseline, _ = imports("-c", "pass")
    require(not {n.split(".")[0] for n in baseline} & FORBIDDEN, f"start-up imports {baseline}")


@pytest.mark.parametrize(
    "how",
    [["tcp"], ["tcp", "--framing", "line"], ["udp"], ["tcp", "--stdin"]],
    ids=["raw", "line", "udp", "stdin-lines"],
)
def test_call_imports_no_asyncio_typing_argparse_re_nor_the_server(
    serve: Callable[..., ServerThread], how: list[str]
) -> None:
    scheme, *options = how
    framing = "line" if "line" in options else "raw"
    st = serve("echo", "tcp://127.0.0.1:0", "udp://127.0.0.1:0", framing=framing)
    if "--stdin" in options:
        names, out = imports("-m", "sockserve", "call", st.url(scheme), stdin=b"one\ntwo\n")
        assert out == b"one\ntwo\n"
    else:
        names, out = imports("-m", "sockserve", "call", *options[:2], st.url(scheme), "hello")
        assert out == b"hello\n"
    assert "sockserve.client.blocking" in names and "sockserve.cli.call" in names, names
    bad = sorted({n.split(".")[0] for n in names} & FORBIDDEN)
    assert not bad, f"sockserve call imported {bad}"
    server_side = sorted(n for n in names if n.startswith(FORBIDDEN_SOCKSERVE))
    assert not server_side, server_side
    assert "sockserve.client.aio" not in names
