#!/usr/bin/env bash
# Before/after benchmark comparison of two checkouts: run benchmarks/run.py from two checkouts,
# alternately, and print every goal of docs/benchmarks.md old vs new.
#
#   benchmarks/ab.sh [-n PAIRS] [--quick] [--keep DIR] OLD NEW [-- RUN.PY OPTIONS...]
#
#   OLD, NEW   checkouts, each with its own .venv (pip install -e '.[test]'), e.g.
#              a worktree of an older commit and this checkout
#   -n PAIRS   how many old/new pairs of runs (default 2; the order flips every pair,
#              old-new then new-old, so drift on the machine hits both sides alike)
#   --quick    pass --quick to run.py (1 round of 1 s): proves the script works, measures nothing
#   --keep DIR keep every run's results.json, report and log in DIR (default: a temp dir, removed)
#   after --   more options for run.py (e.g. -- --rounds 5)
#
# Each run.py gets only the servers the goals compare (sockserve, uvloop, blocking) and all five
# workloads, plus the 10k-connection and `sockserve call` start-up tests, which are goals too.
# run.py writes benchmarks/results.json into its checkout: it is put back as it was after each run,
# and the reports go to the temp dir, so neither checkout's tracked files change.
#
# Output: one line per goal: the old and new figure (median over every round of every run of
# that side; per run in brackets), the change new/old, and the goal's target. Throughput ratios
# move by a few percent between runs on a shared machine: read a change inside the spread of
# the per-run figures as noise. A full comparison with the default 2 pairs takes ~15 minutes of
# both cores; nothing else should run meanwhile.
set -euo pipefail

pairs=2
quick=()
keep=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) pairs="$2"; shift 2 ;;
    --quick) quick=(--quick); shift ;;
    --keep) keep="$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    --) break ;;
    -*) echo "bench-ab: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  echo "usage: bench-ab.sh [-n PAIRS] [--quick] [--keep DIR] OLD NEW [-- RUN.PY OPTIONS...]" >&2
  exit 2
fi
old=$(cd "$1" && pwd)
new=$(cd "$2" && pwd)
shift 2
[ "${1:-}" = "--" ] && shift
extra=("$@")

for side in old new; do
  if [ "$side" = old ]; then dir=$old; else dir=$new; fi
  if [ ! -x "$dir/.venv/bin/python" ] || [ ! -f "$dir/benchmarks/run.py" ]; then
    echo "bench-ab: $dir needs benchmarks/run.py and a .venv (python3 -m venv .venv && .venv/bin/pip install -e '.[test]')" >&2
    exit 2
  fi
  # A C helper built from an older _speedups.c would measure the wrong code.
  so=$(ls "$dir"/src/sockserve/_speedups*.so 2>/dev/null | head -1 || true)
  newer=""
  [ -n "$so" ] && newer=$(find "$dir/src/sockserve" -maxdepth 2 -name '*.c' -newer "$so" | head -1)
  if [ -z "$so" ] || [ -n "$newer" ]; then
    echo "bench-ab: $dir: the C helper is missing or older than its C sources; rebuild it: (cd $dir && .venv/bin/pip install -q -e .)" >&2
    exit 2
  fi
  echo "$side: $dir at $(git -C "$dir" log --oneline -1 | cut -c1-60) | $("$dir/.venv/bin/python" -m sockserve --version)"
done

out=${keep:-$(mktemp -d /tmp/bench-ab.XXXXXX)}
mkdir -p "$out"
[ -n "$keep" ] || trap 'rm -rf "$out"' EXIT

run_side() {  # run_side NAME DIR PAIR
  local name=$1 dir=$2 i=$3 results="$2/benchmarks/results.json" saved=""
  if [ -f "$results" ]; then saved="$out/.saved-results.json"; cp -p "$results" "$saved"; fi
  echo "== pair $i: $name ($dir)"
  local rc=0
  (cd "$dir" && .venv/bin/python benchmarks/run.py --servers sockserve,uvloop,blocking \
      --out "$out/$name-$i.md" ${quick[@]+"${quick[@]}"} ${extra[@]+"${extra[@]}"}) \
      > "$out/$name-$i.log" 2>&1 || rc=$?
  [ -f "$results" ] && cp "$results" "$out/$name-$i.json"
  if [ -n "$saved" ]; then cp -p "$saved" "$results"; else rm -f "$results"; fi
  if [ "$rc" -ne 0 ]; then
    echo "bench-ab: run.py failed in $dir (exit $rc); its output:" >&2
    tail -20 "$out/$name-$i.log" >&2
    exit 1
  fi
  grep -E "^  round|wrote" "$out/$name-$i.log" | sed 's/^/   /' | tail -3
}

for i in $(seq 1 "$pairs"); do
  if [ $((i % 2)) -eq 1 ]; then
    run_side old "$old" "$i"; run_side new "$new" "$i"
  else
    run_side new "$new" "$i"; run_side old "$old" "$i"
  fi
done

python3 - "$out" <<'EOF'
"""Every goal of docs/benchmarks.md, old vs new, from the runs' results.json files."""

import glob
import json
import statistics
import sys

out = sys.argv[1]
# (workload, target, base peer): the throughput goals, as in benchmarks/run.py (GOALS).
GOALS = [
    ("tcp-50", 1.1, "uvloop"),
    ("tcp-1", 1.1, "uvloop"),
    ("unix-50", 1.1, "uvloop"),
    ("unix-1", 1.1, "uvloop"),
    ("udp-50", 1.1, "blocking"),
]
SATURATED = 0.9  # as run.py: core time per request only counts where both cores were busy


def load(side):
    runs = []
    for path in sorted(glob.glob(f"{out}/{side}-*.json")):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def rps_ratios(rounds, wl, base):
    got = []
    for r in rounds:
        a = r.get("sockserve", {}).get(wl, {}).get("rps")
        b = r.get(base, {}).get(wl, {}).get("rps")
        if a and b:
            got.append(float(a) / float(b))
    return got


def core_ratios(rounds, wl, base):
    got = []
    for r in rounds:
        a, b = r.get("sockserve", {}).get(wl, {}), r.get(base, {}).get(wl, {})
        busy = all(float(x.get("server_core_busy", 0)) >= SATURATED for x in (a, b))
        if busy and a.get("server_core_us") and b.get("server_core_us"):
            got.append(float(b["server_core_us"]) / float(a["server_core_us"]))
    return got


def fmt(v):
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"


def figure(runs, per_run):
    """Median over every round of every run, and each run's own median."""
    each = [per_run(run) for run in runs]
    pooled = [v for vs in each for v in vs]
    if not pooled:
        return None, "—"
    med = statistics.median(pooled)
    runs_txt = " ".join(fmt(statistics.median(vs)) if vs else "—" for vs in each)
    return med, f"{fmt(med)} ({runs_txt})"


def extra(runs, test, key):
    vals = [float(run[test][key]) for run in runs if isinstance(run.get(test), dict)]
    return figure([[v] for v in vals], lambda x: x) if vals else (None, "—")


old, new = load("old"), load("new")
if not old or not new:
    sys.exit(f"bench-ab: no results.json collected in {out}")
rows = []
for wl, target, base in GOALS:
    for kind, fn, what in (("throughput", rps_ratios, "x"), ("core time", core_ratios, "x")):
        o = figure(old, lambda run, fn=fn, wl=wl, base=base: fn(run["rounds"], wl, base))
        n = figure(new, lambda run, fn=fn, wl=wl, base=base: fn(run["rounds"], wl, base))
        rows.append((f"{wl} sockserve/{base} {kind}", o, n, f">= {target}{what}" if kind == "throughput" else "(info)"))
rows.append(("10k conns: answered", extra(old, "conn10k", "answered"), extra(new, "conn10k", "answered"), "all (10000)"))
rows.append(("10k conns: bytes per conn", extra(old, "conn10k", "bytes_per_conn"), extra(new, "conn10k", "bytes_per_conn"), "<= 1536"))
rows.append(("10k conns: answered in s", extra(old, "conn10k", "answer_s"), extra(new, "conn10k", "answer_s"), "<= 2"))
rows.append(("call start-up vs python -c pass", extra(old, "startup", "ratio"), extra(new, "startup", "ratio"), "<= 1.3x"))

print()
print(f"{'goal':<38} {'old (per run)':<26} {'new (per run)':<26} {'new/old':>8}  target")
for name, (om, otxt), (nm, ntxt), target in rows:
    change = f"{(nm / om - 1) * 100:+.1f}%" if om and nm is not None else "—"
    print(f"{name:<38} {otxt:<26} {ntxt:<26} {change:>8}  {target}")
print()
print(f"{len(old)} old and {len(new)} new runs; rounds per run: "
      f"{[len(r['rounds']) for r in old]} / {[len(r['rounds']) for r in new]}")
worst = max((float(res.get("foreign_cpu", 0)) for run in old + new for r in run["rounds"]
             for ws in r.values() for res in ws.values()), default=0.0)
print(f"worst foreign CPU load in a kept run: {worst:.2f} cores"
      + ("  (over 0.25: the machine was busy, the figures are noisy)" if worst > 0.25 else ""))
EOF
