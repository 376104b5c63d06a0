"""Shared helpers for the train tests: token shards in the tokenize stage's format, and (until
``stages/tokenize/loader.py`` is importable) a stand-in loader with the same interface."""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

SEQ_LEN = 32
VOCAB = 512


def token_table(num_rows: int, seq_len: int = SEQ_LEN, vocab: int = VOCAB, seed: int = 0, domains=("news", "code")) -> pa.Table:
    """Learnable sequences: each row counts up from a random start (mod a small range), so a
    model's loss falls fast from ln(vocab)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, vocab, size=num_rows)
    step = np.array([1 + (i % len(domains)) for i in range(num_rows)])
    rows = (starts[:, None] + step[:, None] * np.arange(seq_len + 1)[None, :]) % vocab
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1).astype(np.uint16)), seq_len + 1)
    return pa.table({
        "tokens": tokens,
        "source": [domains[i % len(domains)] for i in range(num_rows)],
        "doc_ids": pa.array([[i] for i in range(num_rows)], pa.list_(pa.int64())),
        "doc_offsets": pa.array([[0] for _ in range(num_rows)], pa.list_(pa.int32())),
    })


def write_shards(folder: str, table: pa.Table, rows_per_shard: int = 64) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    files = []
    for i, offset in enumerate(range(0, table.num_rows, rows_per_shard)):
        path = os.path.join(folder, f"part-{i:05d}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table.slice(offset, rows_per_shard))
        files.append(path)
    return files


class StandInLoader:
    """Same constructor, batches and state as ``TokenShardLoader``: a seeded permutation per
    epoch, rows dealt round-robin to ranks, (inputs, targets) = (tokens[:-1], tokens[1:])."""

    def __init__(self, files, batch_size, rank=0, world_size=1, seed=0, storage=None, shuffle=True, loop=True):
        from stages.train.data import read_token_table

        table = read_token_table(list(files), storage, ["tokens"])
        col = table.column("tokens").combine_chunks()
        self.rows = torch.from_numpy(col.flatten().to_numpy().astype(np.int64)).view(-1, col.type.list_size)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world_size, seed
        self.shuffle, self.loop = shuffle, loop
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        n = self.rows.shape[0]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank : n - n % self.world : self.world]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            order = self._order()
            while self.position + self.batch_size <= len(order):
                batch = self.rows[order[self.position : self.position + self.batch_size]]
                self.position += self.batch_size
                yield batch[:, :-1], batch[:, 1:]
            if not self.loop:
                return
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def loader_path() -> str:
    """The real loader once it exists, else the stand-in."""
    try:
        import stages.tokenize.loader  # noqa: F401

        return "stages.tokenize.loader:TokenShardLoader"
    except ImportError:
        return "tests.stages.train_support:StandInLoader"
