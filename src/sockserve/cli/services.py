"""``sockserve services``: the built-in services, their usual ports and what they do."""

from __future__ import annotations

import argparse

from ..services import BUILTINS, DEFAULT_SERVICE


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    width = max(len(n) for n in BUILTINS)
    for name in sorted(BUILTINS):
        info = BUILTINS[name]
        port = str(info.port) if info.port is not None else "-"
        mark = " (default)" if name == DEFAULT_SERVICE else ""
        print(f"{name:<{width}}  {port:>5}  {info.description}{mark}")
    return 0
