"""``sockserve services``: the built-in services, their usual ports and what they do."""

from __future__ import annotations

import argparse

from ..services import BUILTINS, DEFAULT_SERVICE

EPILOG = """\
The port column is the service's usual (well-known, IANA) port, for reference: every
service listens where --listen says, by default tcp:// and udp://127.0.0.1:21567.

examples:
  sockserve services
  sockserve serve daytime -l tcp://127.0.0.1:1313   # the usual port 13 needs root

exit codes:
  0  listed
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    width = max(len(n) for n in BUILTINS)
    print(
        f"{'SERVICE':<{width}}  {'USUAL PORT':>10}  DESCRIPTION (every service serves on --listen)"
    )
    for name in sorted(BUILTINS):
        info = BUILTINS[name]
        port = str(info.port) if info.port is not None else "-"
        mark = " (the default service)" if name == DEFAULT_SERVICE else ""
        print(f"{name:<{width}}  {port:>10}  {info.description}{mark}")
    return 0
