"""The C helper's sources, several units linked into one module ``sockserve._speedups``:
what the split into units must not change for Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from strict import require, tool

import sockserve

try:
    from sockserve import _speedups
except ImportError:  # not built here: CI (CI=true) fails the test that needs it
    _speedups = None  # type: ignore[assignment]

PACKAGE = Path(sockserve.__file__).parent
UNITS = PACKAGE / "_speedups_c"


def test_the_module_exports_its_init_and_nothing_else() -> None:
    require(_speedups is not None, "sockserve._speedups is not built")
    nm = tool("nm")
    require(nm is not None, "nm (binutils) is not installed")
    assert _speedups is not None and nm is not None
    # What the units lend each other is hidden: an exported helper could bind to a
    # symbol of the same name in another library loaded into the process.
    out = subprocess.run(
        [nm, "-D", "--defined-only", _speedups.__file__],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert [line.split()[-1] for line in out.splitlines()] == ["PyInit__speedups"]


def test_a_tree_without_the_built_module_falls_back_to_python(tmp_path: Path) -> None:
    # The sources' folder must not import as sockserve._speedups (a folder of that
    # name would, as an empty namespace package, and fastio would take it for C).
    shutil.copytree(
        PACKAGE, tmp_path / "sockserve", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    env = {k: v for k, v in os.environ.items() if k != "SOCKSERVE_PURE_PYTHON"}
    env["PYTHONPATH"] = str(tmp_path)
    probe = "import sockserve._engine.fastio as f; print(f.__file__, f.SPEEDUPS_STATE, sep='|')"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    ).stdout
    where, state = out.strip().split("|")
    assert where.startswith(str(tmp_path)), where
    assert state == "not built"


def test_every_unit_keeps_to_the_module_size_limit() -> None:
    units = sorted(UNITS.glob("*.[ch]"))
    assert {u.name for u in units} >= {"module.c", "speedups.h"}
    for unit in units:
        lines = len(unit.read_text().splitlines())
        assert lines <= 400, f"{unit.relative_to(PACKAGE)} has {lines} lines (400 at most)"
