"""quality_filter before and after a change, on the same machine in the same minutes: the news
corpus (all four rule families, batches of 2,048, warm: best of 3 passes after one) run from
two source trees in turn, each in a fresh process, ``--rounds`` times interleaved so that a change
of load touches both alike. Prints wall and CPU docs/s of each run (CPU time is the work itself;
on a shared machine wall time adds the waits for a core).

    git worktree add /tmp/before <commit> && .venv/bin/python bench/quality_ab.py --before /tmp/before --after .
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RUN = r"""
import json, sys, time
repo = sys.argv[1]
sys.path[:0] = [repo, repo + "/bench"]
from filters_bench import _batches, corpora
from stages.filters import QualityFilter
from stages.filters.quality import QualityConfig
texts = corpora()["news"]
batches = _batches(texts)
stage = QualityFilter(QualityConfig())
stage.setup()
for b in batches:
    stage.process_batch(b)
wall = cpu = float("inf")
for _ in range(3):
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        stage.process_batch(b)
    wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
print(json.dumps({"docs": len(texts), "docs_per_s": round(len(texts) / wall), "docs_per_cpu_s": round(len(texts) / cpu)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--before", required=True, help="source tree of the old code")
    ap.add_argument("--after", required=True, help="source tree of the new code")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}")
    for _ in range(args.rounds):
        for label, tree in (("before", args.before), ("after", args.after)):
            repo = str(Path(tree).resolve())
            env = {**os.environ, "PYTHONPATH": repo}
            out = subprocess.run([sys.executable, "-c", RUN, repo], env=env, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label:6s} {result['docs_per_s']:>6} docs/s wall  {result['docs_per_cpu_s']:>6} docs/s CPU  load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
