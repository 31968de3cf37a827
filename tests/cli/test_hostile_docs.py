"""A careless new user pastes the docs' shell examples as they are, into bash.

tests/cli/test_docs.py runs every block too, but it inserts readiness waits before each client
command, which hid that the pasted README example failed: ``sockserve serve ... &`` returns
at once, and the very next ``sockserve call`` found the port still closed (exit 3,
"connection refused", both calls). Here the blocks run literally, only with free ports and
scratch paths substituted, and must print what their comments promise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port

REPO = Path(__file__).resolve().parents[2]


def _block(doc: str, marker: str) -> str:
    """The ```sh block of ``doc`` that contains ``marker``."""
    text = (REPO / doc).read_text()
    for body in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        if marker in body:
            return str(body)
    raise AssertionError(f"{doc}: no sh block with {marker!r}")


def _run(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        # a failed line ends the script; its background server must not outlive it
        [
            "bash",
            "-c",
            "set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script + "\nwait\n",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.requires(
    (Path(sys.executable).parent / "sockserve").exists(), "the installed sockserve script"
)
def test_readme_own_service_example_pasted_as_is(tmp_path: Path) -> None:
    port = free_port()
    sock = tmp_path / "upper.sock"
    script = (
        _block("README.md", "upper:upper")
        .replace("127.0.0.1:9000", f"127.0.0.1:{port}")
        .replace("/tmp/upper.sock", str(sock))
    )
    r = _run(script, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["HELLO", "HELLO"], r.stderr


@pytest.mark.requires(
    (Path(sys.executable).parent / "sockserve").exists(), "the installed sockserve script"
)
def test_deployment_workers_example_pasted_as_is(tmp_path: Path) -> None:
    port = free_port()
    script = _block("docs/deployment.md", "--workers 2 &").replace(
        "127.0.0.1:21567", f"127.0.0.1:{port}"
    )
    r = _run(script, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(line.endswith("] hello") for line in lines), r.stderr
