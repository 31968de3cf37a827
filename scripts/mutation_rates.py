"""Kill rate per module from ``mutmut results --all true`` on stdin (used by scripts/mutation).

Timeouts count as killed (the mutant hung a test); the survivors are listed by name, so
``mutmut show NAME`` can print each one.
"""

from __future__ import annotations

import collections
import re
import sys

counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
survivors: dict[str, list[str]] = collections.defaultdict(list)
for line in sys.stdin:
    m = re.match(r"\s*(\S+?)\.(x_|xǁ)\S*__mutmut_\d+: (.+)$", line)
    if not m:
        continue
    module, status = m.group(1), m.group(3).strip()
    counts[module][status] += 1
    if status not in ("killed", "timeout"):
        survivors[module].append(line.split(":")[0].strip())
for module, c in sorted(counts.items()):
    total = sum(c.values())
    killed = c["killed"] + c["timeout"]
    detail = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
    print(f"{module}: {killed}/{total} killed ({100 * killed / total:.0f}%): {detail}")
    for name in survivors[module]:
        print(f"  survived: {name}")
