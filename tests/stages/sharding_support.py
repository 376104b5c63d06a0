"""Worker functions for the sharding tests: run as rank r of w under gloo (spawned processes)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from stages.model.transformer import ModelConfig

# Uneven on purpose: 601 vocabulary rows do not split evenly over 2 or 4 ranks, and span three
# init draws of 256 rows.
MODEL = ModelConfig(vocab_size=601, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32)


def spawn(fn, world_size: int, *args) -> None:
    import torch.multiprocessing as mp

    import uuid

    # a fresh rendezvous file per group: a FileStore file left by an earlier group would be reused
    init_file = f"{args[0]}.pg-{uuid.uuid4().hex}"
    mp.start_processes(_init_and_run, args=(fn, world_size, init_file, args), nprocs=world_size, start_method="spawn")


def _init_and_run(rank: int, fn, world_size: int, init_file: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def initial_weights(rank: int, world_size: int, out_prefix: str) -> None:
    """Build on meta, shard, materialise, then gather the full state dict on rank 0."""
    from stages.model.transformer import Transformer
    from stages.train.config import ParallelConfig
    from stages.train.parallelize import materialize, parallelize

    with torch.device("meta"):
        model = Transformer(MODEL)
    parallelize(model, ParallelConfig(), torch.device("cpu"), world_size, shard=True)
    materialize(model, torch.device("cpu"), seed=7)
    local_bytes = sum(p.to_local().numel() for p in model.parameters())
    state = full_state(model)
    if rank == 0:
        torch.save({"state": state, "local_numel": local_bytes}, f"{out_prefix}.init-{world_size}.pt")


class SyntheticLoader:
    """Deterministic learnable batches per rank (counting sequences), resumable."""

    def __init__(self, rank: int, batch: int, seq_len: int, vocab: int):
        self.rank, self.batch, self.seq_len, self.vocab, self.position = rank, batch, seq_len, vocab, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(1000 * self.rank + self.position)
            starts = torch.randint(0, self.vocab, (self.batch, 1), generator=g)
            rows = (starts + torch.arange(self.seq_len + 1)) % self.vocab
            self.position += 1
            yield rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def accumulate(rank: int, world_size: int, out_prefix: str, sync_every_micro: bool) -> None:
    """Two optimizer steps of two micro-batches each; count reduce-scatters; save the weights."""
    from stages.train.config import TrainConfig
    from stages.train.trainer import Trainer

    cfg = TrainConfig.model_validate({
        "loop": {"steps": 2, "micro_batch_size": 2, "global_batch_tokens": 2 * 2 * 16 * world_size,
                 "spike_std": 0, "log_every": 100, "norms_every": 0, "eval_every": 0},
        "schedule": {"warmup_steps": 1},
    })
    trainer = Trainer(cfg, MODEL, SyntheticLoader(rank, 2, 16, MODEL.vocab_size), seq_len=16, seed=3)
    assert trainer.grad_accum == 2 and trainer.sharded
    if sync_every_micro:  # the behaviour before set_requires_gradient_sync: reduce-scatter every micro-batch
        trainer.model.set_requires_gradient_sync = lambda *a, **k: None
    # FSDP2 reduces a module's gradients (reduce-scatter, or all-reduce on gloo) in foreach_reduce
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fpg

    calls = {"n": 0}
    real = fpg.foreach_reduce

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    fpg.foreach_reduce = counting
    try:
        result = trainer.train()
    finally:
        fpg.foreach_reduce = real
    state = full_state(trainer.model)
    if rank == 0:
        torch.save({"state": state, "reduce_scatters": calls["n"], "history": result["history"]},
                   f"{out_prefix}.accum-{int(sync_every_micro)}.pt")


def results_path(tmp_path: os.PathLike, name: str) -> str:
    return os.path.join(str(tmp_path), name)
