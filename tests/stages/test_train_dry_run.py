"""The fake-process-group dry run: rank r of W builds only its shards, and the states match the formula."""

from __future__ import annotations

import json
import subprocess
import sys


def test_1b_preset_as_rank_7_of_8_holds_an_eighth_and_never_the_full_model():
    # a fresh process: the fake process group and the peak RSS must be this run's alone
    out = subprocess.run([sys.executable, "-m", "stages.train.dry_run", "--size", "1b", "--world-size", "8", "--rank", "7",
                          "--seq-len", "16", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["full_params"] == 1_364_303_872  # OpenLM-1B's shape with a 32,000-token vocabulary
    # every parameter's rows split 8 ways (torch.chunk), measured on the rank's own DTensor shards
    assert r["local_params"] == r["expected_local_params"]
    assert abs(r["local_params"] - r["full_params"] / 8) / r["full_params"] < 0.01
    # fp32 weights + fp32 gradients + AdamW's two moments, all of them this rank's shard only
    assert r["states_match_formula"] and r["state_bytes"] == 16 * r["local_params"]
    # the full model in fp32 is 5.1 GiB; the rank never held it (nor anything near it)
    assert r["never_held_full_model"]
    assert r["peak_rss_bytes"] - r["baseline_rss_bytes"] < 2.0 * r["share_bytes"]
