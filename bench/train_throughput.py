"""Training throughput and MFU of the lmpipe Trainer, torch only (no Ray, no MLflow: the GPU
machine has neither).

    python bench/train_throughput.py                                   # GPU: 125m, 350m, 1b at seq 2048, bf16, compile off/on
    python bench/train_throughput.py --sizes debug --seq-len 256 --device cpu   # CPU smoke numbers
    torchrun --nproc-per-node 8 bench/train_throughput.py --sizes 1b   # FSDP2 over NCCL

Synthetic tokens (uniform over the vocabulary): throughput does not depend on the data. Each
configuration runs ``--warmup`` steps (compilation, allocator) and then times ``--steps`` steps.
MFU = tokens/s per device * FLOPs/token (6N + attention, stages/model/transformer.py) / device peak
(H100 989, A100 312 TFLOP/s dense bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from stages.model.transformer import model_config  # noqa: E402
from stages.train.config import TrainConfig  # noqa: E402
from stages.train.parallelize import param_dtype  # noqa: E402
from stages.train.trainer import Trainer  # noqa: E402


class RandomTokens:
    def __init__(self, batch_size: int, seq_len: int, vocab: int, device: torch.device, seed: int = 0):
        self.shape, self.vocab, self.device = (batch_size, seq_len + 1), vocab, device
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            t = torch.randint(0, self.vocab, self.shape, generator=self.gen).pin_memory() if self.device.type == "cuda" else \
                torch.randint(0, self.vocab, self.shape, generator=self.gen)
            yield t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def measure(size: str, seq_len: int, micro_batch: int, compile_: bool, ac: bool, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    mcfg = model_config(size, max_seq_len=seq_len)
    tcfg = TrainConfig(loop={"steps": warmup + steps, "micro_batch_size": micro_batch, "log_every": 10**9, "norms_every": 0, "eval_every": 0,
                             "spike_std": 0, "deterministic": False},
                       schedule={"warmup_steps": 1}, parallel={"activation_checkpointing": ac, "compile": compile_, "mixed_precision": "auto"})
    trainer = Trainer(tcfg, mcfg, RandomTokens(micro_batch, seq_len, mcfg.vocab_size, device), seq_len, device=device)
    batches = iter(trainer.loader)
    for _ in range(warmup):
        trainer.train_step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        record, _ = trainer.train_step(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tps = trainer.tokens_per_step * steps / elapsed
    out = {
        "size": size, "params": trainer.num_params, "seq_len": seq_len, "micro_batch": micro_batch, "world": world,
        "compile": compile_, "activation_checkpointing": ac, "dtype": str(param_dtype(trainer.parallel, device)).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "tokens_per_s": round(tps, 1), "tokens_per_s_per_device": round(tps / world, 1), "step_s": round(elapsed / steps, 4),
        "gflop_per_token": round(trainer.flops_per_token / 1e9, 3), "final_loss": round(record.loss, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "mfu": round(tps / world * trainer.flops_per_token / trainer.peak_flops, 4) if trainer.peak_flops else None,
    }
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="125m,350m,1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", default="125m=16,350m=8,1b=4,debug=8", help="size=sequences per device")
    p.add_argument("--compile", default="off,on", help="off, on, or off,on")
    p.add_argument("--ac", action="store_true", help="activation checkpointing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args()

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    micro = dict(kv.split("=") for kv in args.micro_batch.split(","))
    for size in args.sizes.split(","):
        for c in args.compile.split(","):
            try:
                row = measure(size, args.seq_len, int(micro.get(size, 4)), c == "on", args.ac, device, args.warmup, args.steps)
            except torch.OutOfMemoryError as e:
                row = {"size": size, "compile": c == "on", "error": f"out of memory: {e}".splitlines()[0]}
            if rank == 0:
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
