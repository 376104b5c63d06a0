"""Which sequences an optimizer step trains on: the loader each rank builds from the train config,
and the micro-batches that make one step. The launcher and the trainer use these, and so does
``lmpipe trace`` (:mod:`stages.train.trace`), so that the sequences trace names for step N are the
ones step N trained on. Nothing here imports torch: trace answers without it."""

from __future__ import annotations

from typing import Optional

from pipeline import storage as st
from stages.tokenize.loader import TokenShardLoader
from stages.train.config import LoopConfig


def accumulation_steps(loop: LoopConfig, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step on every rank: ``global_batch_tokens`` over one micro-batch
    of all ranks (one when it is not set)."""
    tokens_per_micro = loop.micro_batch_size * seq_len * world_size
    target = loop.global_batch_tokens or tokens_per_micro
    if target % tokens_per_micro:
        raise ValueError(
            f"global_batch_tokens {target} is not a multiple of micro_batch_size * seq_len * world_size = {tokens_per_micro}"
        )
    return target // tokens_per_micro


def train_loader(loop: LoopConfig, files: list[str], rank: int, world_size: int, seed: int,
                 storage: Optional[st.Storage] = None, prefetch_threads: int = 1) -> TokenShardLoader:
    """The training loader of rank ``rank`` of ``world_size``: its order depends on the seed, the
    shards and the loop's ``loader_streams`` / ``shuffle_window``, never on the world size."""
    return TokenShardLoader(files, loop.micro_batch_size, rank=rank, world_size=world_size, seed=seed, storage=storage,
                            streams=loop.loader_streams, shuffle_window=loop.shuffle_window, prefetch_threads=prefetch_threads)


def step_micro_batches(step: int, accumulation: int) -> range:
    """The global micro-batch indices (from the start of training) that optimizer step ``step``
    (1-based, as logged) reads: the trainer takes ``accumulation`` consecutive ones per step."""
    return range((step - 1) * accumulation, step * accumulation)
