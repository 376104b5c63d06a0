"""Per-rank memory of the training setup at scale, without the hardware: the fake-process-group
dry run (``stages/train/dry_run.py``) for several presets and world sizes, each in a fresh process.

    python bench/dry_run_scale.py                                  # 1b at W = 2, 4, 8 and 7b at W = 8
    python bench/dry_run_scale.py --runs 7b:8 --seq-len 16

For each: parameters this rank holds, its weights + grads + AdamW states against the formula
(16 bytes per local fp32 parameter), and the process's peak RSS above its baseline (torch
imported), as a multiple of that share. Goal (issue #13): the 7b rank of 8 within 1.5x its share,
far below the full model's 27 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="1b:2,1b:4,1b:8,7b:8", help="comma list of size:world_size")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--rank", type=int, default=0, help="rank 0 holds the largest shard (torch.chunk rounds up)")
    p.add_argument("--out", default=None, help="append JSON rows here")
    args = p.parse_args()
    gib = lambda n: n / 2**30  # noqa: E731
    print("| preset | W | params (full) | params (rank) | weights+grads+AdamW (rank) | formula | peak RSS above baseline | / share | full model fp32 | setup s | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs.split(","):
        size, world = run.split(":")
        cmd = [sys.executable, "-m", "stages.train.dry_run", "--size", size, "--world-size", world, "--rank", str(args.rank),
               "--seq-len", str(args.seq_len), "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode not in (0, 1) or not out.stdout.strip():
            print(f"| {size} | {world} | FAILED: {(out.stderr.strip().splitlines() or ['?'])[-1][:200]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
        print(f"| {size} | {world} | {r['full_params'] / 1e9:.2f} B | {r['local_params'] / 1e6:.0f} M | {gib(r['state_bytes']):.2f} GiB "
              f"| {gib(r['share_bytes']):.2f} GiB{' ✓' if r['states_match_formula'] else ' ✗'} | {gib(r['peak_rss_bytes'] - r['baseline_rss_bytes']):.2f} GiB "
              f"| {r['peak_rss_over_share']:.2f}x | {gib(r['full_model_fp32_bytes']):.1f} GiB | {r['setup_s']} | {r.get('step_s', '-')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
