"""Summarising rounds: medians, goal ratios, core-time ratios and the cells of the report's tables."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from workloads import Peer, Rounds, Workload


def median_of(rounds: Rounds, peer: str, wl: str, key: str) -> float | None:
    vals = [float(r[peer][wl][key]) for r in rounds if wl in r.get(peer, {}) and key in r[peer][wl]]  # type: ignore[arg-type]
    return statistics.median(vals) if vals else None


def goal_ratio(
    rounds: Rounds, wl: str, base: str, ours: str = "sockserve"
) -> tuple[float, list[float]] | None:
    ratios = []
    for r in rounds:
        a = r.get(ours, {}).get(wl, {}).get("rps")
        b = r.get(base, {}).get(wl, {}).get("rps")
        if a and b:
            ratios.append(float(a) / float(b))  # type: ignore[arg-type]
    return (statistics.median(ratios), ratios) if ratios else None


#: A server core at least this busy was the limit; below it, the server waited on the
#: generator (or, with one connection, on the client's round trip).
SATURATED = 0.9


def capacity_ratio(
    rounds: Rounds, wl: str, base: str, ours: str = "sockserve"
) -> tuple[float, list[float]] | None:
    """Per-round ratios of core time per request (base over sockserve): the speed-up a
    generator with room to spare would show. Only rounds where both server cores were
    saturated count: an idle core's time per request measures waiting (and sockserve's
    busy-poll fills such waits), not work."""
    ratios = []
    for r in rounds:
        a, b = r.get(ours, {}).get(wl, {}), r.get(base, {}).get(wl, {})
        saturated = all(float(x.get("server_core_busy", 0)) >= SATURATED for x in (a, b))  # type: ignore[arg-type]
        if saturated and a.get("server_core_us") and b.get("server_core_us"):
            ratios.append(float(b["server_core_us"]) / float(a["server_core_us"]))  # type: ignore[arg-type]
    return (statistics.median(ratios), ratios) if ratios else None


def best_of(rounds: Rounds, peer: str, wl: str) -> float:
    """Highest requests/s of the rounds: interference only ever slows a run down."""
    vals = [float(r[peer][wl]["rps"]) for r in rounds if wl in r.get(peer, {})]  # type: ignore[arg-type]
    return max(vals, default=0.0)


def table(
    peers: list[Peer], workloads: list[Workload], cell: Callable[[str, str], str]
) -> list[str]:
    """A markdown table: a row per server, a column per workload, ``cell(peer, workload)``."""
    rows = ["| server | " + " | ".join(w.name for w in workloads) + " |"]
    rows.append("|---" * (len(workloads) + 1) + "|")
    for p in peers:
        rows.append(f"| {p.label} | " + " | ".join(cell(p.name, w.name) for w in workloads) + " |")
    return rows


def fmt_rps(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fmt_us(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f} µs" if v < 10_000 else f"{v / 1000:,.1f} ms"


def _foreign(rounds: Rounds) -> list[float]:
    """Every kept run's foreign CPU load (cores other processes used during it)."""
    runs = [res for r in rounds for ws in r.values() for res in ws.values()]
    return [float(res.get("foreign_cpu", 0.0)) for res in runs]  # type: ignore[arg-type]


def worst_foreign(rounds: Rounds) -> float:
    return max(_foreign(rounds), default=0.0)


def median_foreign(rounds: Rounds) -> float:
    vals = _foreign(rounds)
    return statistics.median(vals) if vals else 0.0
