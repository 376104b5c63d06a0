"""The per-rank memory formula (``stages/train/memory.py``) against the peak GPU memory of the
recorded H200 runs (``bench/recorded/gpu_check_h200_*.jsonl``: ``bench/gpu_check.py``, one rank of
FSDP2 on one GPU, bf16 compute, fp32 master weights and AdamW, one micro-batch per step).

    python bench/memory_formula.py

Prints one row per recorded run: the formula's terms, its peak, the recorded
``torch.cuda.max_memory_allocated`` and their ratio. Needs no GPU: the rows are the measurement.
"""

from __future__ import annotations

import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 32_000  # bench/gpu_check.py's vocabulary


def rows() -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "recorded", "gpu_check_h200_*.jsonl"))):
        with open(path) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def compare(row: dict) -> dict:
    from stages.model.transformer import model_config
    from stages.train.memory import rank_memory

    cfg = model_config(row["size"], vocab_size=VOCAB, max_seq_len=row["seq_len"])
    terms = rank_memory(cfg, 1, row["micro_batch"], row["seq_len"], sharded=True, compute_bytes=2,
                        activation_checkpointing=row["activation_checkpointing"])
    recorded = row["peak_memory_gib"] * 2**30
    return {"size": row["size"], "compile": row["compile"], "activation_checkpointing": row["activation_checkpointing"],
            "micro_batch": row["micro_batch"], "seq_len": row["seq_len"], **terms.as_dict(), "recorded": recorded,
            "ratio": recorded / terms.peak}


def main() -> int:
    gib = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
    print("| preset | compile | act. ckpt | micro-batch | fp32 state | mixed precision | activations | logits | formula peak | recorded peak | recorded / formula |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows():
        c = compare(row)
        print(f"| {c['size']} | {'on' if c['compile'] else 'off'} | {'on' if c['activation_checkpointing'] else 'off'} | {c['micro_batch']} "
              f"| {gib(c['fp32_state'])} | {gib(c['mixed_precision'])} | {gib(c['activations'])} | {gib(c['logits'])} "
              f"| {gib(c['peak'])} | {gib(c['recorded'])} | {c['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
