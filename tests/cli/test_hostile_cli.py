"""Hostile-user pass on the CLI: output into a pipe whose reader has gone.

``sockserve services | head -1`` printed a BrokenPipeError traceback (item 20 fixed it for
``bench``, ``call`` and ``chat`` only). Every command that writes to stdout now exits 0
quietly when the reader has left, as ``call`` does.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from support import SOCKSERVE


@pytest.mark.parametrize(
    "argv",
    [
        ["services"],
        ["completion", "bash"],
        ["--help"],
        ["serve", "--help"],
        ["--version"],
    ],
    ids=lambda a: " ".join(a),
)
def test_output_to_a_closed_pipe_is_no_traceback(argv: list[str]) -> None:
    r, w = os.pipe()
    os.close(r)  # the reader (`head -1`) is already gone: the first write fails with EPIPE
    try:
        proc = subprocess.run(
            [*SOCKSERVE, *argv], stdout=w, stderr=subprocess.PIPE, timeout=20, check=False
        )
    finally:
        os.close(w)
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 0, err


@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_metrics_address_is_refused_before_anything_listens(workers: str) -> None:
    """``--metrics bad`` is a usage error found before binding: no "listening on" lines
    for a server that is not going to run (it logged them, then exited 2)."""
    proc = subprocess.run(
        [
            *SOCKSERVE,
            "serve",
            "--listen",
            "tcp://127.0.0.1:0",
            "--metrics",
            "bad",
            "--workers",
            workers,
        ],
        capture_output=True,
        timeout=20,
        check=False,
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert "expected HOST:PORT" in err and "listening on" not in err, err
