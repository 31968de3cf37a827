"""The shape of the code, checked: layers import only downward, no import cycle at all (lazy and
``TYPE_CHECKING`` imports count), no module over 400 lines, no folder over 12 modules.

Why a test: these rules are what keeps the code readable as it grows, and each one was broken
once without anyone noticing (a six-module import cycle through lazy imports, an 818-line module).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = SRC / "sockserve"

#: Most lines a module may have: past this a module holds more than one concern.
MAX_LINES = 400
#: Most modules a folder may hold before it wants sub-packages.
MAX_MODULES = 12

#: What each part may not import (the parts above it).
FORBIDDEN = {
    "sockserve.errors": ("sockserve.",),
    "sockserve.endpoints": (
        "sockserve.framing",
        "sockserve.service",
        "sockserve._engine",
        "sockserve.server",
        "sockserve.deploy",
        "sockserve.relay",
        "sockserve.cli",
        "sockserve.client",
        "sockserve.bench",
    ),
    "sockserve.framing": (
        "sockserve.service",
        "sockserve._engine",
        "sockserve.server",
        "sockserve.deploy",
        "sockserve.relay",
        "sockserve.cli",
        "sockserve.client",
        "sockserve.bench",
    ),
    "sockserve.service": (
        "sockserve._engine",
        "sockserve.server",
        "sockserve.deploy",
        "sockserve.relay",
        "sockserve.cli",
        "sockserve.client",
        "sockserve.bench",
    ),
    "sockserve.services": (
        "sockserve._engine",
        "sockserve.server",
        "sockserve.deploy",
        "sockserve.relay",
        "sockserve.cli",
        "sockserve.client",
        "sockserve.bench",
    ),
    "sockserve._engine": (
        "sockserve.server",
        "sockserve.deploy",
        "sockserve.relay",
        "sockserve.cli",
        "sockserve.client",
        "sockserve.bench",
    ),
    "sockserve.server": (
        "sockserve.deploy",
        "sockserve.relay",
        "sockserve.cli",
        "sockserve.client",
        "sockserve.bench",
    ),
    "sockserve.deploy": ("sockserve.relay", "sockserve.cli", "sockserve.client", "sockserve.bench"),
    "sockserve.relay": ("sockserve.cli", "sockserve.client", "sockserve.bench"),
    "sockserve.client": (
        "sockserve._engine",
        "sockserve.server",
        "sockserve.deploy",
        "sockserve.relay",
        "sockserve.cli",
        "sockserve.bench",
    ),
    "sockserve.bench": ("sockserve.server", "sockserve.deploy", "sockserve.relay", "sockserve.cli"),
}


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules(PACKAGE)


def _imports(name: str) -> set[str]:
    """Every sockserve module ``name`` imports anywhere: top level, in functions, under
    ``TYPE_CHECKING``."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            # A module always imports its own packages first: not an edge of the graph.
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_layers_import_only_downward(part: str) -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name == part or name.startswith(part + ".")
        for target in targets
        if any(
            target == f.rstrip(".")
            or target.startswith(f if f.endswith(".") else f + ".")
            or target == f
            for f in FORBIDDEN[part]
        )
    )
    assert wrong == []


def _source_files(root: Path) -> list[Path]:
    return [
        p for p in root.rglob("*") if p.suffix in (".py", ".c") and "__pycache__" not in p.parts
    ]


@pytest.mark.parametrize("root", ["src", "benchmarks"])
def test_no_module_over_the_line_limit(root: str) -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _source_files(ROOT / root)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


@pytest.mark.parametrize("root", ["src", "benchmarks"])
def test_no_folder_over_the_module_limit(root: str) -> None:
    counts: dict[str, int] = {}
    for p in _source_files(ROOT / root):
        if p.name != "__init__.py":
            key = str(p.parent.relative_to(ROOT))
            counts[key] = counts.get(key, 0) + 1
    assert {k: n for k, n in counts.items() if n > MAX_MODULES} == {}
