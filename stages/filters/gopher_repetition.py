"""Gopher repetition rules (Rae et al. 2021): duplicated paragraphs and lines, the most common
2-4-grams, and duplicated 5-10-grams, each as a fraction of the document.

Paragraphs are split on blank lines and lines on newlines, as datatrove does; n-grams are over
the spaCy-compatible word tokens (words.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import StrictModel
from stages.filters import kernels
from stages.filters.text_arrays import Tokens, duplicate_stats, name_first_reason, ratio, split_line_runs, split_lines


class GopherRepetitionConfig(StrictModel):
    """Gopher repetition rules (fractions of the document's characters or elements)."""

    enabled: bool = True
    dup_para_frac: Optional[float] = Field(default=0.3, ge=0, le=1)
    dup_para_char_frac: Optional[float] = Field(default=0.2, ge=0, le=1)
    dup_line_frac: Optional[float] = Field(default=0.3, ge=0, le=1)
    dup_line_char_frac: Optional[float] = Field(default=0.2, ge=0, le=1)
    top_2_gram_frac: Optional[float] = Field(default=0.20, ge=0)
    top_3_gram_frac: Optional[float] = Field(default=0.18, ge=0)
    top_4_gram_frac: Optional[float] = Field(default=0.16, ge=0)
    dup_5_gram_frac: Optional[float] = Field(default=0.15, ge=0)
    dup_6_gram_frac: Optional[float] = Field(default=0.14, ge=0)
    dup_7_gram_frac: Optional[float] = Field(default=0.13, ge=0)
    dup_8_gram_frac: Optional[float] = Field(default=0.12, ge=0)
    dup_9_gram_frac: Optional[float] = Field(default=0.11, ge=0)
    dup_10_gram_frac: Optional[float] = Field(default=0.10, ge=0)


SCORE_COLUMNS: dict[str, pa.DataType] = {
    k: pa.float64() for k in (
        "gopher_dup_para_frac", "gopher_dup_para_char_frac", "gopher_dup_line_frac", "gopher_dup_line_char_frac",
        "gopher_top_2_gram_frac", "gopher_top_3_gram_frac", "gopher_top_4_gram_frac",
        *(f"gopher_dup_{k}_gram_frac" for k in range(5, 11)),
    )
}


def score_gopher_repetition(texts: pa.Array, toks: Tokens, text_len: np.ndarray, cfg: GopherRepetitionConfig) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    paras, para_off = split_lines(pc.utf8_trim_whitespace(texts), r"\n{2,}", drop_trailing_empty=False)
    dup, dup_chars = duplicate_stats(paras, para_off)
    out["gopher_dup_para_frac"] = ratio(dup, np.diff(para_off))
    out["gopher_dup_para_char_frac"] = ratio(dup_chars, text_len)
    lines, line_off = split_line_runs(texts)
    dup, dup_chars = duplicate_stats(lines, line_off)
    out["gopher_dup_line_frac"] = ratio(dup, np.diff(line_off))
    out["gopher_dup_line_char_frac"] = ratio(dup_chars, text_len)

    out.update(_ngram_scores(toks, text_len))
    return out


def _ngram_scores(toks: Tokens, text_len: np.ndarray) -> dict[str, np.ndarray]:
    """Top 2-4-gram and duplicated 5-10-gram character fractions.

    An n-gram is a sequence of token ids, compared by a 64-bit key (kernels.py; a
    ~2^-64 collision chance per pair). Only 2-grams are counted over every position: an n-gram
    can only occur twice where its leading (n-1)-gram occurs twice, so each larger n is counted
    over the positions whose (n-1)-gram repeats -- a few percent of them in natural text."""
    cum = np.concatenate([[0], np.cumsum(toks.lengths())]).astype(np.int64)
    top, dup = kernels.ngram_chars(toks.ids.astype(np.uint64), cum, toks.doc_offsets.astype(np.int64))
    out: dict[str, np.ndarray] = {}
    for size in range(2, 5):
        out[f"gopher_top_{size}_gram_frac"] = ratio(top[size - 2], text_len)
    for size in range(5, 11):
        out[f"gopher_dup_{size}_gram_frac"] = ratio(dup[size - 5], text_len)
    return out


def decide_gopher_repetition(s: dict, cfg: GopherRepetitionConfig, reason: np.ndarray) -> None:
    for key in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac",
                "top_2_gram_frac", "top_3_gram_frac", "top_4_gram_frac", "dup_5_gram_frac", "dup_6_gram_frac",
                "dup_7_gram_frac", "dup_8_gram_frac", "dup_9_gram_frac", "dup_10_gram_frac"):
        thr = getattr(cfg, key)
        if thr is not None:
            name_first_reason(reason, s[f"gopher_{key}"] > thr, "gopher_" + key.replace("_frac", ""))
