"""Shared helpers for the train tests: small token shards in the tokenize stage's format."""

from __future__ import annotations

import os
import numpy as np
import pyarrow as pa

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
