"""Gopher repetition rules (Rae et al. 2021): duplicated paragraphs and lines, the most common
2-4-grams, and duplicated 5-10-grams, each as a fraction of the document.

Paragraphs are split on blank lines and lines on newlines, as datatrove does; n-grams are over
the spaCy-compatible word tokens (words.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import StrictModel
from stages.filters.text_arrays import Tokens, duplicate_stats, name_first_reason, owner, ratio, split_lines


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


# Odd 64-bit multipliers that mix token ids into n-gram hashes; _K3 salts each hash with its
# document so that the same n-gram in two documents counts separately.
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)
_K3 = np.uint64(0x165667B19E3779F9)


def score_gopher_repetition(texts: pa.Array, toks: Tokens, text_len: np.ndarray, cfg: GopherRepetitionConfig) -> dict[str, np.ndarray]:
    n = len(texts)
    out: dict[str, np.ndarray] = {}
    paras, para_off = split_lines(pc.utf8_trim_whitespace(texts), r"\n{2,}", drop_trailing_empty=False)
    dup, dup_chars = duplicate_stats(paras, para_off)
    out["gopher_dup_para_frac"] = ratio(dup, np.diff(para_off))
    out["gopher_dup_para_char_frac"] = ratio(dup_chars, text_len)
    lines, line_off = split_lines(texts, r"\n+", drop_trailing_empty=False)
    dup, dup_chars = duplicate_stats(lines, line_off)
    out["gopher_dup_line_frac"] = ratio(dup, np.diff(line_off))
    out["gopher_dup_line_char_frac"] = ratio(dup_chars, text_len)

    out.update(_ngram_scores(toks, text_len, n))
    return out


def _ngram_scores(toks: Tokens, text_len: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Top 2-4-gram and duplicated 5-10-gram character fractions.

    Only 2-grams are counted over every position. An n-gram can only occur twice where its
    leading (n-1)-gram occurs twice, so each larger n is counted over the positions whose
    (n-1)-gram repeats -- a few percent of them in natural text."""
    out: dict[str, np.ndarray] = {}
    offs = toks.doc_offsets
    n_tok = np.diff(offs)
    total = int(offs[-1])
    if total == 0:
        for size in range(2, 5):
            out[f"gopher_top_{size}_gram_frac"] = np.zeros(n)
        for size in range(5, 11):
            out[f"gopher_dup_{size}_gram_frac"] = np.zeros(n)
        return out
    own = owner(offs)
    ids = toks.ids
    cum = np.concatenate([[0], np.cumsum(toks.lengths())])
    local = np.arange(total) - offs[own]
    base = ids.astype(np.uint64) * _K1 + np.uint64(1)
    salt = own.astype(np.uint64) * _K3
    pos = np.flatnonzero(local <= n_tok[own] - 2)
    with np.errstate(over="ignore"):
        h = base[pos] * _K2 + base[pos + 1]
    repeated = None
    for size in range(2, 11):
        if size > 2:
            keep = repeated & (local[pos] <= n_tok[own[pos]] - size)
            pos = pos[keep]
            with np.errstate(over="ignore"):
                h = h[keep] * _K2 + base[pos + size - 1]
        counts = occurrence_counts(h ^ salt[pos])
        repeated = counts > 1
        if size <= 4:
            # the most common n-gram, the first one among equals (Counter.most_common); where no
            # n-gram repeats that is the document's first n-gram
            best = np.zeros(n, np.float64)
            has = n_tok >= size
            first = offs[:-1][has]
            best[has] = cum[first + size] - cum[first] + size - 1
            if repeated.any():
                rp, rc = pos[repeated], counts[repeated]
                rown = own[rp]
                rank = rc.astype(np.int64) * (1 << 32) + ((1 << 32) - 1 - local[rp])
                starts = np.concatenate([[0], np.flatnonzero(np.diff(rown)) + 1])
                top = np.maximum.reduceat(rank, starts)
                at = offs[rown[starts]] + ((1 << 32) - 1 - (top & ((1 << 32) - 1)))
                best[rown[starts]] = (top >> 32) * (cum[at + size] - cum[at] + size - 1)
            out[f"gopher_top_{size}_gram_frac"] = ratio(best, text_len)
        else:
            rp = pos[repeated]
            out[f"gopher_dup_{size}_gram_frac"] = ratio(
                _greedy_duplicate_chars((h ^ salt[pos])[repeated], cum[rp + size] - cum[rp], local[rp], own[rp], size, n), text_len
            )
    return out


def _greedy_duplicate_chars(keys, chars, local_pos, owners, size: int, n: int) -> np.ndarray:
    """datatrove's find_all_duplicate, walking only positions whose n-gram occurs twice or more:
    a repeated n-gram adds its characters and skips the next ``size - 1`` positions."""
    out = np.zeros(n, np.float64)
    if len(keys) == 0:
        return out
    bounds = np.flatnonzero(np.diff(owners)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(keys)]])
    keys_l, chars_l, pos_l = keys.tolist(), chars.tolist(), local_pos.tolist()
    for s, e in zip(starts.tolist(), ends.tolist()):
        seen: set = set()
        skip_until = -1
        repeated = 0
        for i in range(s, e):
            p = pos_l[i]
            if p < skip_until:
                continue
            key = keys_l[i]
            if key in seen:
                repeated += chars_l[i]
                skip_until = p + size
            else:
                seen.add(key)
        out[int(owners[s])] = repeated
    return out


def occurrence_counts(keys: np.ndarray) -> np.ndarray:
    """How often each element's value occurs in the array (a hash table, not a sort)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    codes, _ = pd.factorize(keys)
    return np.bincount(codes)[codes]


def decide_gopher_repetition(s: dict, cfg: GopherRepetitionConfig, reason: np.ndarray) -> None:
    for key in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac",
                "top_2_gram_frac", "top_3_gram_frac", "top_4_gram_frac", "dup_5_gram_frac", "dup_6_gram_frac",
                "dup_7_gram_frac", "dup_8_gram_frac", "dup_9_gram_frac", "dup_10_gram_frac"):
        thr = getattr(cfg, key)
        if thr is not None:
            name_first_reason(reason, s[f"gopher_{key}"] > thr, "gopher_" + key.replace("_frac", ""))
