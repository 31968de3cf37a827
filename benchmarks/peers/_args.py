"""Command line shared by the peer servers: which endpoints to listen on.

Every peer takes ``--tcp PORT``, ``--unix PATH`` and ``--udp PORT`` (any
subset) on 127.0.0.1, so the runner drives them all the same way.
"""

from __future__ import annotations

import argparse
import os


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--tcp", type=int)
    p.add_argument("--unix")
    p.add_argument("--udp", type=int)
    args = p.parse_args()
    if args.unix and os.path.exists(args.unix):
        os.unlink(args.unix)
    return args
