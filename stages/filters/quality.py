"""Quality rules: Gopher repetition, Gopher quality, C4 and FineWeb, scored then decided.

Every rule family (one module each) first *scores* a whole batch into typed attribute columns
(ratios, counts) and then *decides* from thresholds, so each rejected row says which rule fired
and the values that made it fire. Defaults are the published values, as implemented by
datatrove (the reference we measure agreement against, see BENCHMARKS.md).

The families share one tokenisation of the batch (text_arrays.py) and run as Arrow kernels and
numpy over whole batches; only the spaCy affix rules (words.py) and the greedy duplicate-n-gram
walk (over repeated positions only) run per item in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import StrictModel
from stages.filters import c4, fineweb, gopher_quality, gopher_repetition
from stages.filters.c4 import C4Config
from stages.filters.fineweb import FineWebConfig
from stages.filters.gopher_quality import GopherQualityConfig
from stages.filters.gopher_repetition import GopherRepetitionConfig
from stages.filters.text_arrays import np_of, tokenize_docs


class QualityConfig(StrictModel):
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    max_doc_chars: int = Field(
        default=2_000_000, ge=1,
        description="longer documents are dropped as quality_doc_too_long without scoring (bounds memory and time)",
    )


SCORE_COLUMNS: dict[str, pa.DataType] = {
    **gopher_repetition.SCORE_COLUMNS,
    **gopher_quality.SCORE_COLUMNS,
    **c4.SCORE_COLUMNS,
    **fineweb.SCORE_COLUMNS,
}


@dataclass
class QualityResult:
    scores: dict[str, np.ndarray]  # only the enabled families' columns
    reason: np.ndarray  # object array: None = keep
    text: pa.Array  # C4-rewritten text for rows that C4 did not drop, the original otherwise


def score_and_decide(texts: pa.Array, cfg: QualityConfig) -> QualityResult:
    """Score every enabled rule family on a batch of valid texts, then decide in FineWeb's
    order (Gopher repetition, Gopher quality, C4, FineWeb): the first rule that fires names
    the drop reason."""
    n = len(texts)
    text_len = np_of(pc.utf8_length(texts), np.float64)
    toks = tokenize_docs(texts)
    scores: dict[str, np.ndarray] = {}
    reason = np.full(n, None, dtype=object)
    if cfg.gopher_repetition.enabled:
        s = gopher_repetition.score_gopher_repetition(texts, toks, text_len, cfg.gopher_repetition)
        scores.update(s)
        gopher_repetition.decide_gopher_repetition(s, cfg.gopher_repetition, reason)
    if cfg.gopher_quality.enabled:
        s = gopher_quality.score_gopher_quality(texts, toks, cfg.gopher_quality)
        scores.update(s)
        gopher_quality.decide_gopher_quality(s, cfg.gopher_quality, reason)
    out_text = texts
    fine_text, fine_words = texts, np.diff(toks.doc_offsets)
    if cfg.c4.enabled:
        c4_result = c4.score_c4(texts, toks, text_len, cfg.c4)
        scores.update(c4_result.scores)
        c4.decide_c4(c4_result.scores, c4_result.doc_reason, cfg.c4, reason)
        passed = reason == None  # noqa: E711
        out_text = pc.if_else(pa.array(passed), c4_result.text, texts) if n else texts
        fine_text, fine_words = c4_result.text, c4_result.words
    if cfg.fineweb.enabled:
        s = fineweb.score_fineweb(fine_text, fine_words, cfg.fineweb)
        scores.update(s)
        fineweb.decide_fineweb(s, cfg.fineweb, reason)
    return QualityResult(scores, reason, out_text)
