"""What a ``tokenize`` stage tells the stages after it (training, evaluation)."""

from __future__ import annotations

from typing import Optional

from pipeline.config import StrictModel
from pipeline.contracts import StageSummary


class MixtureReport(StrictModel):
    weights: Optional[dict[str, float]]  # as configured (None: the natural mix)
    rates: dict[str, float]  # copies per document per source
    capped_by_max_copies: list[str]
    target_shares: Optional[dict[str, float]]
    achieved_shares: dict[str, float]


class TokenizeSummary(StageSummary):
    kind = "tokenize"

    seq_len: int
    vocab_size: int
    dtype: str  # of the token ids in the shards
    eos_id: Optional[int]
    bos_id: Optional[int]
    tokenizer_path: str  # tokenizer.json, relative to the stage's folder (it travels with the shards)
    pad_id: Optional[int] = None
    add_bos: bool = False
    tokenizer_sha256: Optional[str] = None
    # what was packed (reports: a stage that imports ready-made shards may leave them empty)
    documents: dict[str, dict[str, int]] = {}  # split -> source -> documents
    tokens_encoded: dict[str, dict[str, int]] = {}  # split -> source -> tokens before mixing
    tokens: dict[str, dict[str, int]] = {}  # split -> source -> tokens after mixing
    sequences: dict[str, int] = {}  # split -> packed sequences
    tokens_in_sequences: dict[str, int] = {}
    dropped_tail_tokens: dict[str, int] = {}
    buckets: dict[str, int] = {}  # split -> hash buckets = shards (a function of the data and config only)
    rows_per_batch: Optional[int] = None  # sequences per shard record batch (also in each shard's schema metadata)
    packed_bytes: dict[str, int] = {}  # split -> bytes of the packed (bucketed) intermediate files
    shuffle_bytes_read: dict[str, int] = {}  # split -> bytes the shard writers read back (footers included)
    mixture: Optional[MixtureReport] = None
    timings: dict[str, float] = {}

    @property
    def prefix_token(self) -> Optional[int]:
        """What conditions an empty context: BOS when the tokenizer has one, else EOS."""
        return self.bos_id if self.bos_id is not None else self.eos_id
