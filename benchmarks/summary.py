"""Summarising rounds: medians, goal ratios, core-time ratios and the cells of the report's tables."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from workloads import BEFORE, BY_NAME, GOALS, Peer, Rounds, Workload


def median_of(rounds: Rounds, peer: str, wl: str, key: str) -> float | None:
    vals = [float(r[peer][wl][key]) for r in rounds if wl in r.get(peer, {}) and key in r[peer][wl]]  # type: ignore[arg-type]
    return statistics.median(vals) if vals else None


def goal_ratio(
    rounds: Rounds, wl: str, base: str, ours: str = "sockserve", key: str = "rps"
) -> tuple[float, list[float]] | None:
    """Per-round ratios of ``key`` (ours over base) and their median."""
    ratios = []
    for r in rounds:
        a = r.get(ours, {}).get(wl, {}).get(key)
        b = r.get(base, {}).get(wl, {}).get(key)
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
    """A markdown table: a row per server that runs any of ``workloads``, a column per
    workload, ``cell(peer, workload)``."""
    rows = ["| server | " + " | ".join(w.name for w in workloads) + " |"]
    rows.append("|---" * (len(workloads) + 1) + "|")
    for p in peers:
        if not any(w.name in p.workloads for w in workloads):
            continue
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


def tables(
    peers: list[Peer], workloads: list[Workload], cell: Callable[[str, str], str]
) -> list[str]:
    """One :func:`table` per sockserve server's workloads (raw, line, length, async), so
    each shows only the servers that run them; a blank line before each."""
    by_ours: dict[str, list[Workload]] = {}
    for w in workloads:
        by_ours.setdefault(w.ours, []).append(w)
    return [line for group in by_ours.values() for line in ["", *table(peers, group, cell)]]


def measured_goals(
    rounds: Rounds, workloads: list[Workload]
) -> list[tuple[str, float, str, str, float, list[float]]]:
    """Each goal whose workload was measured: (workload, target, peer, our server, the
    median per-round ratio, the per-round ratios)."""
    names = {w.name for w in workloads}
    out = []
    for wl, target, base in GOALS:
        ours = BY_NAME[wl].ours
        got = goal_ratio(rounds, wl, base, ours) if wl in names else None
        if got is not None:
            out.append((wl, target, base, ours, *got))
    return out


def peer_rows(rounds: Rounds, peers: list[Peer], workloads: list[Workload]) -> list[str]:
    """The issue-12 table: each goal's workload, its peer, both servers' requests/s, the
    ratio (per round), the ratio of process CPU per request, and with ``--before`` the
    older commit's ratio against the same peer in the same rounds."""
    labels = {p.name: p.label for p in peers}
    have_before = any(p.name.endswith(BEFORE) for p in peers)
    head = "| workload | peer | sockserve req/s | peer req/s | sockserve / peer | CPU per request, peer / sockserve |"
    rule = "|---|---|---|---|---|---|"
    if have_before:
        head += " before: req/s | before / peer | after / before |"
        rule += "---|---|---|"
    lines = [head + " target |", rule + "---|"]
    for wl, target, base, ours, ratio, each in measured_goals(rounds, workloads):
        cpu = cpu_ratio(rounds, wl, base, ours)
        row = (
            f"| {wl} | {labels[base]} | {fmt_rps(median_of(rounds, ours, wl, 'rps'))} "
            f"| {fmt_rps(median_of(rounds, base, wl, 'rps'))} "
            f"| **{ratio:.2f}x** ({', '.join(f'{r:.2f}' for r in each)}) "
            f"| {'—' if cpu is None else f'{cpu:.2f}x'} |"
        )
        if have_before:
            old = goal_ratio(rounds, wl, base, ours + BEFORE)
            gain = goal_ratio(rounds, wl, ours + BEFORE, ours)
            row += (
                f" {fmt_rps(median_of(rounds, ours + BEFORE, wl, 'rps'))} "
                f"| {'—' if old is None else f'{old[0]:.2f}x'} "
                f"| {'—' if gain is None else f'{gain[0]:.2f}x'} |"
            )
        lines.append(row + f" >= {target:.1f}x |")
    return lines


def cpu_ratio(rounds: Rounds, wl: str, base: str, ours: str) -> float | None:
    """Median per-round ratio of process CPU per request (base over ours)."""
    got = goal_ratio(rounds, wl, ours, base, key="server_cpu_us")
    return got[0] if got else None
