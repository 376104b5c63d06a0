"""FineWeb's rules (Penedo et al. 2024): line punctuation ratio, short-line ratio, duplicated-line
characters, list-like documents (newlines per word).

They run on C4's output when C4 is enabled, as in the FineWeb recipe (see quality.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import StrictModel
from stages.filters import words
from stages.filters.text_arrays import duplicate_stats, name_first_reason, np_of, owner, per_owner_sum, ratio, split_lines

TERMINAL_END = words.re2_class(words.TERMINAL_PUNCTUATION) + "$"


class FineWebConfig(StrictModel):
    """FineWeb's rules; run on C4's output when C4 is enabled (the FineWeb recipe)."""

    enabled: bool = True
    line_punct_thr: float = Field(default=0.12, ge=0, le=1)
    line_punct_exclude_zero: bool = False
    short_line_thr: float = Field(default=0.67, ge=0, le=1)
    short_line_length: int = Field(default=30, ge=0)
    char_duplicates_ratio: float = Field(default=0.01, ge=0, le=1)
    new_line_ratio: float = Field(default=0.3, ge=0)


SCORE_COLUMNS: dict[str, pa.DataType] = {
    "fineweb_lines": pa.int64(),
    "fineweb_line_punct_ratio": pa.float64(),
    "fineweb_short_line_ratio": pa.float64(),
    "fineweb_char_dup_ratio": pa.float64(),
    "fineweb_list_ratio": pa.float64(),
}


def score_fineweb(texts: pa.Array, n_words: np.ndarray, cfg: FineWebConfig) -> dict[str, np.ndarray]:
    n = len(texts)
    lines, off = split_lines(texts, "\n", drop_trailing_empty=False)
    if len(lines):
        nonblank = pc.not_equal(pc.utf8_trim_whitespace(lines), "")
        lines = lines.filter(nonblank)
        off = np.concatenate([[0], np.cumsum(np.bincount(owner(off)[np_of(nonblank)], minlength=n))])
    own = owner(off)
    n_lines = np.diff(off)
    if len(lines):
        ends = np_of(pc.match_substring_regex(lines, TERMINAL_END))
        short = np_of(pc.less_equal(pc.utf8_length(lines), cfg.short_line_length))
    else:
        ends = short = np.zeros(0, bool)
    _, dup_chars = duplicate_stats(lines, off)
    newlines = np_of(pc.count_substring(texts, "\n"), np.float64)
    chars_no_nl = np_of(pc.utf8_length(texts), np.float64) - newlines
    return {
        "fineweb_lines": n_lines.astype(np.int64),
        "fineweb_line_punct_ratio": ratio(per_owner_sum(own, ends, n), n_lines),
        "fineweb_short_line_ratio": ratio(per_owner_sum(own, short, n), n_lines),
        "fineweb_char_dup_ratio": ratio(dup_chars, chars_no_nl),
        "fineweb_list_ratio": np.divide(newlines, n_words, out=np.where(newlines > 0, np.inf, 0.0), where=n_words > 0),
    }


def decide_fineweb(s: dict, cfg: FineWebConfig, reason: np.ndarray) -> None:
    name_first_reason(reason, s["fineweb_lines"] == 0, "fineweb_empty")
    lp = s["fineweb_line_punct_ratio"]
    name_first_reason(reason, (lp < cfg.line_punct_thr) & ~((lp == 0) & cfg.line_punct_exclude_zero), "fineweb_line_punct_ratio")
    name_first_reason(reason, s["fineweb_short_line_ratio"] > cfg.short_line_thr, "fineweb_short_line_ratio")
    name_first_reason(reason, s["fineweb_char_dup_ratio"] > cfg.char_duplicates_ratio, "fineweb_char_dup_ratio")
    name_first_reason(reason, s["fineweb_list_ratio"] > cfg.new_line_ratio, "fineweb_list_ratio")
