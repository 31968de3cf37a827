"""The load generator behind ``sockserve bench``: an epoll engine, a histogram, a report.

Split so each part is tested on its own: :mod:`.spec` is the plain data (what
to run, what was measured), :mod:`.histogram` pure arithmetic, :mod:`.connections`
the sockets, sending and reconnecting, :mod:`.engine` the run in one process,
:mod:`.procs` forks engines for ``--procs``, :mod:`.report` turns a result into
text or JSON.
"""

from __future__ import annotations

from .engine import LoadEngine, run_load
from .histogram import Histogram
from .procs import run_procs
from .report import render, summary
from .spec import LoadResult, LoadSpec, TlsOptions

__all__ = [
    "Histogram",
    "LoadEngine",
    "LoadResult",
    "LoadSpec",
    "TlsOptions",
    "render",
    "run_load",
    "run_procs",
    "summary",
]
