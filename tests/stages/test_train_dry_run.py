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


def test_the_dry_run_takes_the_trainers_own_step_and_reports_the_terms_apart():
    """Through ``Trainer.train_step``: two micro-batches accumulated, the norm clipped, AdamW
    stepped on the fp32 shards, the trainer's norms; bf16 compute is a term of its own."""
    out = subprocess.run([sys.executable, "-m", "stages.train.dry_run", "--size", "debug", "--world-size", "4", "--rank", "1",
                          "--seq-len", "16", "--micro-batch", "2", "--grad-accum", "2", "--mixed-precision", "bf16",
                          "--vocab-size", "512", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["grad_accum"] == 2 and r["micro_batches"] == 2
    assert r["step"]["skipped"] is None and {"param_norm", "optim_exp_avg_norm", "activation_rms/layer_00"} <= set(r["step"]["norms"])
    # the master weights, gradients and AdamW's moments stay fp32 shards under bf16 compute
    assert r["states_match_formula"] and r["state_bytes"] == 16 * r["local_params"]
    f = r["formula"]
    assert f["fp32_state"] == r["share_bytes"]
    assert f["mixed_precision"] > 0 and f["accumulation"] == 4 * r["full_params"]  # unsharded fp32 (reduce dtype) between micro-batches
    assert f["activations"] > 0 and f["logits"] == 2 * 16 * 512 * 12


def test_the_memory_formula_matches_the_recorded_h200_peaks():
    """bench/recorded: one H200, FSDP2, bf16. Eager and activation-checkpointed runs within 5% of
    torch.cuda.max_memory_allocated; compiled runs without checkpointing save less (fused
    element-wise work), so there the formula is an upper bound."""
    from bench.memory_formula import compare, rows

    recorded = rows()
    assert len(recorded) >= 15
    for row in map(compare, recorded):
        if row["compile"] and not row["activation_checkpointing"]:
            assert 0.7 < row["ratio"] <= 1.0, row
        else:
            assert 0.95 <= row["ratio"] <= 1.05, row
