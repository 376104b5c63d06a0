"""The first sequences of each domain of a tokenize stage's validation split: what training
(validation loss, in-loop evaluation) and the evaluate stage score.

One reader for both. It streams the split shard by shard and record batch by record batch (a
shard's batches are read one at a time from its footer, so S3 reads only those bytes), keeps at
most ``limit`` rows per domain in the shards' own dtype, and stops as soon as every domain it
expects is full. Memory is ``limit x domains`` sequences, whatever the split's size; at 1 T
tokens a 1% split is ~20 GB that every training rank used to read whole and widen to int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa

from pipeline import storage as st


@dataclass(frozen=True)
class ValidationSample:
    """Rows in the split's order: ``tokens[i]`` (``[seq_len + 1]``) came from domain ``sources[i]``."""

    tokens: np.ndarray  # [rows, seq_len + 1], the shards' dtype (uint16 or uint32): never widened here
    sources: tuple[str, ...]
    shards_read: int  # shards opened before every domain was full (or all of them)
    rows_read: int  # rows of those shards' record batches that were read

    def by_domain(self) -> dict[str, np.ndarray]:
        """Each domain's rows, in split order, domains sorted by name."""
        sources = np.asarray(self.sources, dtype=object)
        return {domain: self.tokens[sources == domain] for domain in sorted(set(self.sources))}


def first_per_domain(files: list[str], storage: Optional[st.Storage], limit: Optional[int],
                     domains: Iterable[str] = ()) -> ValidationSample:
    """The first ``limit`` rows of each domain (``None``: every row) of the shards ``files``, in
    their order. ``domains``: the sources the split holds (the tokenize summary lists them); once
    each has ``limit`` rows, nothing more is read. Without them the whole split is read, still
    keeping at most ``limit`` rows per domain."""
    storage = storage or st.Storage()
    expected = set(domains)
    counts: dict[str, int] = {}
    kept_tokens: list[np.ndarray] = []
    kept_sources: list[str] = []
    width = None
    shards_read = rows_read = 0

    def full() -> bool:
        return limit is not None and bool(expected) and all(counts.get(d, 0) >= limit for d in expected)

    for uri in files:
        if full():
            break
        shards_read += 1
        fs, path = storage.arrow_fs(uri)
        with fs.open_input_file(path) as f:
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                if full():
                    break
                batch = reader.get_batch(i)
                rows_read += batch.num_rows
                sources = batch.column(batch.schema.get_field_index("source")).to_pylist()
                take = []
                for row, source in enumerate(sources):
                    if limit is None or counts.get(source, 0) < limit:
                        counts[source] = counts.get(source, 0) + 1
                        take.append(row)
                if not take:
                    continue
                column = batch.column(batch.schema.get_field_index("tokens"))
                width = column.type.list_size
                flat = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
                kept_tokens.append(flat[take].copy())  # a copy: the batch's buffers are let go
                kept_sources.extend(sources[r] for r in take)
    tokens = np.concatenate(kept_tokens) if kept_tokens else np.zeros((0, width or 0), dtype=np.uint32)
    return ValidationSample(tokens, tuple(kept_sources), shards_read, rows_read)
