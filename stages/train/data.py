"""What the training loop reads: the tokenize stage's Arrow shards.

Training batches come from the tokenize stage's resumable ``TokenShardLoader``. Validation is
small, so it is read whole here, grouped by the ``source`` column (one loss per domain).
"""

from __future__ import annotations

from typing import Optional

import torch

from pipeline import storage as st
from stages.tokenize.shards import read_token_table

def read_validation(files: list[str], storage: Optional[st.Storage], max_sequences_per_domain: int) -> dict[str, torch.Tensor]:
    """Every rank's validation sequences per domain: the first ``max`` of each, ``[n, seq_len + 1]`` int64."""
    if not files:
        return {}
    table = read_token_table(files, storage, ["tokens", "source"])
    sources = table.column("source").to_pylist()
    tokens = table.column("tokens").combine_chunks()
    width = tokens.type.list_size
    flat = torch.from_numpy(tokens.flatten().to_numpy(zero_copy_only=False).astype("int64")).view(-1, width)
    return {domain: flat[[i for i, s in enumerate(sources) if s == domain][:max_sequences_per_domain]] for domain in sorted(set(sources))}


def rank_share(sets: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's part of each domain, dealt round-robin, with the same ``n`` on every rank."""
    out: dict[str, torch.Tensor] = {}
    for domain, rows in sets.items():
        per_rank = len(rows) // world_size
        if per_rank == 0:
            continue  # fewer sequences than ranks: this domain cannot be split evenly
        out[domain] = rows[rank : per_rank * world_size : world_size]
    return out


def validation_sets(files: list[str], storage: Optional[st.Storage], rank: int, world_size: int,
                    max_sequences_per_domain: int) -> dict[str, torch.Tensor]:
    """This rank's validation sequences per domain (see :func:`read_validation`, :func:`rank_share`)."""
    return rank_share(read_validation(files, storage, max_sequences_per_domain), rank, world_size)
