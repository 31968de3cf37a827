"""Turning a :class:`LoadResult` into what people read: a table, a histogram, a progress line, JSON.

Pure functions of the result (plus a small progress printer), so the output is
tested without a network and scripts get the same numbers as the table.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from .histogram import Histogram
from .spec import LoadResult, LoadSpec

#: Percentiles in the table and the JSON, with their JSON key stems.
PERCENTILES: tuple[tuple[float, str], ...] = (
    (50.0, "p50"),
    (90.0, "p90"),
    (99.0, "p99"),
    (99.9, "p999"),
)
#: Rows and bar width of the terminal histogram: fits 80 columns.
HIST_ROWS = 16
BAR_WIDTH = 40


def summary(result: LoadResult, spec: LoadSpec, procs: int = 1) -> dict[str, object]:
    """The one JSON object ``--json`` prints: headline numbers first, settings after."""
    h = result.hist
    out: dict[str, object] = {
        "rps": round(result.rps, 1),
        "requests": h.count,
        "duration_s": round(result.elapsed, 4),
    }
    for p, key in PERCENTILES:
        out[f"{key}_us"] = _us(h.percentile(p))
    out["max_us"] = _us(h.max)
    out["min_us"] = _us(h.min)
    out["mean_us"] = round(h.mean / 1000, 1)
    out["errors"] = result.errors
    out["timeouts"] = result.timeouts
    out["error_reasons"] = dict(result.error_reasons)
    out["reconnects"] = result.reconnects
    out["aborted"] = result.aborted
    out["interrupted"] = result.interrupted
    out["url"] = spec.endpoint.url()
    out["conns"] = result.conns or spec.conns
    out["procs"] = procs
    out["size"] = len(spec.payload)
    out["framing"] = spec.framing if spec.endpoint.is_stream else "datagram"
    out["pipeline"] = spec.pipeline
    out["rate"] = spec.rate
    out["warmup_s"] = spec.warmup
    return out


def _us(ns: int) -> float:
    return round(ns / 1000, 1)


def fmt_latency(ns: float) -> str:
    """``87µs``, ``1.24ms``, ``2.50s``: three significant figures, unit chosen to fit."""
    us = ns / 1000
    if us < 1000:
        return f"{us:.0f}µs" if us >= 10 else f"{us:.1f}µs"
    if us < 1_000_000:
        return f"{us / 1000:.3g}ms"
    return f"{us / 1_000_000:.3g}s"


def describe(spec: LoadSpec, procs: int) -> str:
    """One line saying what was run, for the top of the report."""
    what = "datagrams" if not spec.endpoint.is_stream else f"{spec.framing} framing"
    loop = f"open loop at {spec.rate:,.0f} req/s" if spec.rate else "closed loop"
    length = f"{spec.requests:,} requests" if spec.requests else f"{spec.duration:g} s"
    p = f", pipeline {spec.pipeline}" if spec.pipeline > 1 else ""
    return (
        f"{spec.endpoint.url()}: {spec.conns} connection{'s' * (spec.conns != 1)}, "
        f"{procs} process{'es' * (procs != 1)}, {len(spec.payload)}-byte requests ({what}{p}), "
        f"{loop}, {length}"
    )


def render(result: LoadResult, spec: LoadSpec, procs: int = 1, *, unicode: bool = True) -> str:
    """The end-of-run report: headline table, latency table, histogram."""
    h = result.hist
    lines = [describe(spec, procs), ""]
    lines.append(
        f"  requests/s  {result.rps:>12,.1f}    ({h.count:,} requests in {result.elapsed:.2f} s)"
    )
    lines.append(f"  errors      {result.errors:>12,}    timeouts {result.timeouts:,}")
    for reason, n in sorted(result.error_reasons.items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"      {n:>8,} x {reason}")
    if result.reconnects:
        lines.append(f"  reconnects  {result.reconnects:>12,}")
    if result.aborted:
        lines.append(f"  aborted: {result.aborted}")
    if result.interrupted:
        lines.append("  interrupted (Ctrl-C): the figures cover the time measured so far")
    lines.append("")
    heads = [f"p{p:g}" for p, _ in PERCENTILES] + ["max", "mean"]
    values = [h.percentile(p) for p, _ in PERCENTILES] + [h.max, int(h.mean)]
    lines.append("  latency     " + "".join(f"{k:>10}" for k in heads))
    lines.append("              " + "".join(f"{fmt_latency(v):>10}" for v in values))
    if h.count:
        lines.append("")
        lines.extend(draw_histogram(h, unicode=unicode))
    return "\n".join(lines)


def draw_histogram(h: Histogram, *, rows: int = HIST_ROWS, unicode: bool = True) -> list[str]:
    """Latency distribution as text bars over log-spaced bins from min to max.

    Log spacing because latency spans decades: a tail at 10 ms and a body at
    100 µs both stay visible.
    """
    lo = max(h.min, 1)
    hi = max(h.max, lo + 1)
    ratio = (hi / lo) ** (1 / rows)
    edges = [lo * ratio**i for i in range(rows + 1)]
    edges[-1] = hi + 1
    bins = [0] * rows
    for low, high, count in h.nonzero():
        mid = (low + high) / 2
        i = 0 if mid <= lo else min(rows - 1, int(math.log(mid / lo) / math.log(ratio)))
        bins[i] += count
    top = max(bins) or 1
    full, part = ("█", " ▏▎▍▌▋▊▉") if unicode else ("#", "        ")
    out = ["  latency histogram (requests per bin)"]
    for i, count in enumerate(bins):
        eighths = round(count / top * BAR_WIDTH * 8)
        bar = full * (eighths // 8) + (part[eighths % 8] if eighths % 8 else "")
        if count and not bar:
            bar = part[1] if unicode else "."
        out.append(f"  {fmt_latency(edges[i]):>9} {bar:<{BAR_WIDTH}} {count:>10,}")
    return out


class ProgressLine:
    """A live ``elapsed  req/s  errors`` line on a terminal, rewritten in place.

    Shows the rate over the last interval, not the average, so stalls are seen
    as they happen. Prints nothing unless ``stream`` is a terminal (scripts and
    pipes get only the final report).
    """

    def __init__(self, stream: TextIO | None = None, every: float = 0.5) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.every = every
        self._last_t = 0.0
        self._last_n = 0
        self._shown = False
        self._warming = False

    def __call__(self, elapsed: float, done: int, errors: int, timeouts: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if elapsed >= 0 and self._warming:
            # Counters restart when measuring starts: rate from the start of the measured phase.
            self._warming = False
            self._last_t, self._last_n = now - elapsed, 0
        elif elapsed < 0:
            self._warming = True
        if now - self._last_t < self.every:
            return
        rate = (
            (done - self._last_n) / (now - self._last_t)
            if self._last_t and done >= self._last_n
            else 0.0
        )
        self._last_t, self._last_n = now, done
        if elapsed < 0:
            text = "  warming up..."
        else:
            text = f"  {elapsed:6.1f} s  {rate:>10,.0f} req/s  errors {errors:,}  timeouts {timeouts:,}"
        self.stream.write("\r" + text.ljust(70))
        self.stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * 70 + "\r")
            self.stream.flush()
