"""What the training loop reads: the tokenize stage's Arrow shards.

Training batches come from the tokenize stage's resumable ``TokenShardLoader``. Validation is the
first ``loop.eval_max_sequences`` sequences of each domain (``source``), streamed by the reader
the evaluate stage uses too (:mod:`stages.tokenize.validation`): one loss per domain.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from pipeline import storage as st
from stages.tokenize.validation import first_per_domain


def read_validation(files: list[str], storage: Optional[st.Storage], max_sequences_per_domain: int,
                    domains: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Every rank's validation sequences per domain: the first ``max`` of each, ``[n, seq_len + 1]``
    int64 (only those rows are widened). ``domains``: the split's sources, to stop reading early."""
    if not files:
        return {}
    sample = first_per_domain(files, storage, max_sequences_per_domain, domains)
    return {domain: torch.from_numpy(rows.astype("int64")) for domain, rows in sample.by_domain().items()}


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
                    max_sequences_per_domain: int, domains: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """This rank's validation sequences per domain (see :func:`read_validation`, :func:`rank_share`)."""
    return rank_share(read_validation(files, storage, max_sequences_per_domain, domains), rank, world_size)
