"""Dry-run one training step as rank ``r`` of ``W`` on one CPU, without the hardware.

torch's fake process group (``backend="fake"``: every collective returns at once without
communicating) lets one process build exactly what rank ``r`` of a ``W``-rank FSDP2 job builds:
the model on ``meta``, sharded, then only this rank's shards allocated and initialised. It then
takes one optimizer step through the trainer's own ``train_step`` -- gradient accumulation over
``--grad-accum`` micro-batches (FSDP2 keeps the unsharded gradients until the last), the global
gradient norm and clipping, AdamW -- and the trainer's norms, so it measures the step that training
takes. It reports this rank's weight, gradient and optimizer-state bytes against the formula
(4 + 4 + 8 bytes per locally held fp32 parameter), and, apart from that fp32 state, the terms a
GPU adds (:mod:`stages.train.memory`: mixed-precision copies, accumulated gradients, activations,
logits) beside the process's peak RSS -- so a user can see what a 7B run needs per rank before
renting 8 GPUs (torchtitan has the same idea: its fake-backend "comm mode" for memory estimation).

The numbers in a fake run are garbage (all-gathers return what the buffers held), the memory is
not: every buffer has the size and lifetime it has in the real job. The activations are those of
the micro-batch given (use the real ``--seq-len``/``--micro-batch`` to include them; the defaults
keep them small so that the states dominate), and on CPU they are fp32 unless
``--mixed-precision bf16``.

    python -m stages.train.dry_run --size 7b --world-size 8 --rank 0
    python -m stages.train.dry_run --size 1b --world-size 8 --seq-len 16 --json
    python -m stages.train.dry_run --size 7b --world-size 8 --seq-len 2048 --micro-batch 2 --activation-checkpointing --estimate-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

import torch

from stages.model.transformer import local_tensor

CPU = torch.device("cpu")


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _bytes(tensors) -> int:
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def expected_local_numel(model: torch.nn.Module, world_size: int, rank: int) -> int:
    """Parameters this rank holds under FSDP2's dim-0 sharding: ``torch.chunk``'s split of each
    parameter's rows, computed from the global shapes alone."""
    total = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        rows = p.shape[0]
        per = -(-rows // world_size)
        mine = max(0, min(per, rows - rank * per))
        total += mine * (p.numel() // rows)
    return total


class _RandomTokens:
    """Random token rows; counts the micro-batches the step drew."""

    def __init__(self, batch: int, seq_len: int, vocab: int):
        self.batch, self.seq_len, self.vocab = batch, seq_len, vocab
        self.drawn = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            rows = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=g)
            self.drawn += 1
            yield rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def estimate(size: str, world_size: int, seq_len: int, micro_batch: int, vocab_size: int = 32_000,
             activation_checkpointing: bool = False, mixed_precision: str = "bf16", grad_accum: int = 1,
             overrides: Optional[dict[str, Any]] = None) -> dict[str, int]:
    """The formula alone (:func:`stages.train.memory.rank_memory`) for a GPU run: no model is built."""
    from stages.model.transformer import model_config
    from stages.train.memory import rank_memory

    cfg = model_config(size, vocab_size=vocab_size, max_seq_len=seq_len, **(overrides or {}))
    return rank_memory(cfg, world_size, micro_batch, seq_len, sharded=True, compute_bytes=2 if mixed_precision == "bf16" else 4,
                       activation_checkpointing=activation_checkpointing, grad_accum=grad_accum).as_dict()


def dry_run(size: str, world_size: int, rank: int = 0, seq_len: int = 64, micro_batch: int = 1, vocab_size: int = 32_000,
            step: bool = True, activation_checkpointing: bool = False, overrides: Optional[dict[str, Any]] = None,
            grad_accum: int = 1, mixed_precision: str = "fp32", grad_clip: float = 1.0) -> dict[str, Any]:
    """Build rank ``rank`` of ``world_size`` under a fake process group and take one training
    step with the trainer's ``train_step``; returns its report."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from stages.model.transformer import model_config
    from stages.train.config import TrainConfig
    from stages.train.memory import rank_memory
    from stages.train.parallelize import param_dtype
    from stages.train.trainer import Trainer, peak_memory_bytes

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    cfg = model_config(size, vocab_size=vocab_size, max_seq_len=seq_len, **(overrides or {}))
    full_params = cfg.num_params()
    baseline = _rss_now_bytes()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        train_cfg = TrainConfig.model_validate({
            "loop": {"steps": 2, "micro_batch_size": micro_batch, "global_batch_tokens": micro_batch * seq_len * world_size * grad_accum,
                     "norms_every": 1, "eval_every": 0, "spike_std": 0, "on_nonfinite": "skip"},
            "optimizer": {"grad_clip": grad_clip},
            "schedule": {"warmup_steps": 1},
            "parallel": {"activation_checkpointing": activation_checkpointing, "mixed_precision": mixed_precision},
        })
        t0 = time.perf_counter()
        data = _RandomTokens(micro_batch, seq_len, vocab_size)
        trainer = Trainer(train_cfg, cfg, data, seq_len, seed=0)
        setup_s = time.perf_counter() - t0
        after_setup = peak_memory_bytes(CPU)
        params = list({id(p): p for p in trainer.model.parameters()}.values())
        local_numel = sum(local_tensor(p).numel() for p in params)
        expected_numel = expected_local_numel(trainer.model, world_size, rank)
        compute_bytes = torch.tensor([], dtype=param_dtype(train_cfg.parallel, CPU)).element_size()
        terms = rank_memory(cfg, world_size, micro_batch, seq_len, sharded=trainer.sharded, compute_bytes=compute_bytes,
                            activation_checkpointing=activation_checkpointing, grad_accum=trainer.grad_accum,
                            local_params=expected_numel)
        report: dict[str, Any] = {
            "size": size, "world_size": world_size, "rank": rank, "seq_len": seq_len, "micro_batch": micro_batch,
            "grad_accum": trainer.grad_accum, "mixed_precision": mixed_precision, "activation_checkpointing": activation_checkpointing,
            "vocab_size": vocab_size, "full_params": full_params, "full_model_fp32_bytes": full_params * 4,
            "local_params": local_numel, "expected_local_params": expected_numel,
            "param_bytes": _bytes(params), "setup_s": round(setup_s, 1),
            "baseline_rss_bytes": baseline, "peak_rss_after_setup_bytes": after_setup,
            "formula": terms.as_dict(),
        }
        if step:
            t0 = time.perf_counter()
            grad_bytes = []  # measured when AdamW has stepped: train_step frees the gradients at its end
            hook = trainer.optimizer.register_step_post_hook(
                lambda *_: grad_bytes.append(_bytes(p.grad for p in params if p.grad is not None)))
            try:
                record, _ = trainer.train_step(iter(trainer.loader))
            finally:
                hook.remove()
            norms = trainer.norms()
            report["step_s"] = round(time.perf_counter() - t0, 1)
            report["micro_batches"] = data.drawn
            report["step"] = {"loss": record.loss, "grad_norm": record.grad_norm, "skipped": record.skipped,
                              "clipped": grad_clip > 0 and record.grad_norm > grad_clip, "norms": sorted(norms)}
            report["grad_bytes"] = grad_bytes[0] if grad_bytes else 0
            report["optimizer_bytes"] = _bytes(v for s in trainer.optimizer.state.values() for v in s.values()
                                               if isinstance(v, torch.Tensor) and v.dim() > 0)
        peak = peak_memory_bytes(CPU)
        # what the formula says this rank must hold: fp32 weights + fp32 grads + two fp32 Adam moments
        share = expected_numel * (4 + (4 + 8 if step else 0))
        measured = report["param_bytes"] + report.get("grad_bytes", 0) + report.get("optimizer_bytes", 0)
        report.update({
            "share_bytes": share, "state_bytes": measured, "peak_rss_bytes": peak,
            "peak_rss_over_share": round((peak - baseline) / share, 3),
            # above the fp32 state: what the step itself took (gathered copies, accumulation, activations, logits)
            "step_rss_above_state_bytes": max(0, peak - baseline - measured),
            "states_match_formula": local_numel == expected_numel and measured == share,
            "never_held_full_model": peak - baseline < full_params * 4,
        })
        return report
    finally:
        dist.destroy_process_group()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _terms(f: dict[str, int]) -> str:
    return (f"fp32 state {_gib(f['fp32_state'])} (weights {_gib(f['weights'])}, grads {_gib(f['grads'])}, AdamW {_gib(f['optimizer'])}); "
            f"mixed precision {_gib(f['mixed_precision'])}, accumulated grads {_gib(f['accumulation'])}, "
            f"activations {_gib(f['activations'])}, logits {_gib(f['logits'])}; peak {_gib(f['peak'])}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.train.dry_run", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1b", help="a preset of stages/model/transformer.py MODEL_SIZES")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--vocab-size", type=int, default=32_000)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--mixed-precision", choices=("fp32", "bf16"), default="fp32",
                   help="compute dtype of the CPU step (a GPU run uses bf16; --estimate-only assumes it)")
    p.add_argument("--no-step", action="store_true", help="set up only (no gradients, no optimizer states)")
    p.add_argument("--estimate-only", action="store_true", help="print the formula's terms for a bf16 GPU run; build nothing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.estimate_only:
        f = estimate(args.size, args.world_size, args.seq_len, args.micro_batch, args.vocab_size, args.activation_checkpointing,
                     "bf16", args.grad_accum)
        print(json.dumps(f) if args.json else f"{args.size}, rank of {args.world_size}, bf16 on GPU: {_terms(f)}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    r = dry_run(args.size, args.world_size, args.rank, args.seq_len, args.micro_batch, args.vocab_size,
                step=not args.no_step, activation_checkpointing=args.activation_checkpointing, grad_accum=args.grad_accum,
                mixed_precision=args.mixed_precision)
    if args.json:
        print(json.dumps(r))
        return 0 if r["states_match_formula"] else 1
    print(f"{r['size']}: {r['full_params']:,} parameters ({_gib(r['full_model_fp32_bytes'])} in fp32); "
          f"rank {r['rank']} of {r['world_size']} holds {r['local_params']:,} (formula: {r['expected_local_params']:,})")
    print(f"  measured: weights {_gib(r['param_bytes'])}, grads {_gib(r.get('grad_bytes', 0))}, AdamW {_gib(r.get('optimizer_bytes', 0))}"
          f" = {_gib(r['state_bytes'])} (formula: {_gib(r['share_bytes'])})")
    if "step" in r:
        s = r["step"]
        print(f"  step: {r['micro_batches']} micro-batch(es) accumulated, grad norm {s['grad_norm']:.3g}"
              f"{' (clipped)' if s['clipped'] else ''}{', skipped: ' + s['skipped'] if s['skipped'] else ''}; norms {', '.join(s['norms'][:3])}, ...")
    print(f"  formula, this step ({r['mixed_precision']}): {_terms(r['formula'])}")
    print(f"  peak RSS {_gib(r['peak_rss_bytes'])} ({_gib(r['baseline_rss_bytes'])} before building) = "
          f"{r['peak_rss_over_share']}x the share above the baseline, {_gib(r['step_rss_above_state_bytes'])} above the fp32 state; "
          f"setup {r['setup_s']}s, step {r.get('step_s', '-')}s")
    ok = r["states_match_formula"]
    print("  OK: the states match the formula" if ok else "  MISMATCH: the states differ from the formula")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
