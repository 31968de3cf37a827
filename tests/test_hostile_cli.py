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
