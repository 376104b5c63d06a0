"""What a ``train_tokenizer`` stage tells the stages after it."""

from __future__ import annotations

from typing import Optional

from pipeline.contracts import StageSummary


class TokenizerSummary(StageSummary):
    kind = "tokenizer"

    path: str  # tokenizer.json, relative to the stage's folder
    sha256: str
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    pad_id: Optional[int]
    bos: Optional[str]
    eos: Optional[str]
    pad: Optional[str]
    loaded_from: Optional[str] = None  # config.path, when loaded rather than trained
    trained_on_docs: Optional[int] = None
    trained_on_chars: Optional[int] = None
    sample_fraction: Optional[float] = None
