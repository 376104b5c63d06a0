"""Gopher quality rules (Rae et al. 2021, Table A1): document length in words, mean word length,
'#' and ellipses per word, bullet and ellipsis-ending lines, words with a letter, stop words.

Words are the spaCy-compatible tokens (words.py) that are not made only of punctuation.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import StrictModel
from stages.filters import words
from stages.filters.text_arrays import Tokens, name_first_reason, np_of, owner, per_owner_sum, ratio

# Python's str.isspace() characters, for RE2 (whose \s is ASCII only).
WS = r"[\t\n\x0b\x0c\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
SYMBOL_TOKEN = "^" + words.re2_class(words.PUNCTUATION_SET) + "+$"


class GopherQualityConfig(StrictModel):
    """Gopher quality rules; ``null`` disables a rule."""

    enabled: bool = True
    min_doc_words: Optional[int] = Field(default=50, ge=0)
    max_doc_words: Optional[int] = Field(default=100_000, ge=0)
    min_avg_word_length: Optional[float] = Field(default=3, ge=0)
    max_avg_word_length: Optional[float] = Field(default=10, ge=0)
    max_symbol_word_ratio: Optional[float] = Field(default=0.1, ge=0, description="'#' and ellipses per word")
    max_bullet_lines_ratio: Optional[float] = Field(default=0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: Optional[float] = Field(default=0.3, ge=0, le=1)
    min_alpha_words_ratio: Optional[float] = Field(default=0.8, ge=0, le=1, description="words with a letter / all words")
    min_stop_words: Optional[int] = Field(default=2, ge=0, description="distinct stop words required")
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")


SCORE_COLUMNS: dict[str, pa.DataType] = {
    "gopher_words": pa.int64(),
    "gopher_tokens": pa.int64(),
    "gopher_mean_word_length": pa.float64(),
    "gopher_hash_ratio": pa.float64(),
    "gopher_ellipsis_ratio": pa.float64(),
    "gopher_bullet_lines_ratio": pa.float64(),
    "gopher_ellipsis_lines_ratio": pa.float64(),
    "gopher_alpha_words_ratio": pa.float64(),
    "gopher_stop_words": pa.int64(),
}


def score_gopher_quality(texts: pa.Array, toks: Tokens, cfg: GopherQualityConfig) -> dict[str, np.ndarray]:
    n = len(texts)
    own = owner(toks.doc_offsets)
    n_tok = np.diff(toks.doc_offsets).astype(np.float64)
    vocab = toks.batch.vocab
    symbol = toks.vocab_flag(SYMBOL_TOKEN)
    lengths = toks.lengths()
    alpha = toks.vocab_flag(r"\pL")
    if len(vocab):
        stop_vocab = np_of(pc.fill_null(pc.index_in(vocab, value_set=pa.array(list(cfg.stop_words), pa.string())), -1), np.int64)
        stop_idx = toks.batch.per_token(stop_vocab)
    else:
        stop_idx = np.zeros(0, np.int64)
    words_ = per_owner_sum(own, ~symbol, n)
    stop = np.zeros(n, np.int64)
    for k in range(len(cfg.stop_words)):
        stop += np.bincount(own[stop_idx == k], minlength=n) > 0
    lines, line_off = toks.lines, toks.doc_line_offsets
    line_own = owner(line_off)
    n_lines = np.diff(line_off)
    bullets = np_of(pc.match_substring_regex(lines, "^" + WS + "*[•-]")) if len(lines) else np.zeros(0, bool)
    ell_end = np_of(pc.match_substring_regex(lines, r"(?:\.\.\.|…)" + WS + "*$")) if len(lines) else np.zeros(0, bool)
    hashes = toks.count_per_doc("#")
    ellipses = toks.count_per_doc("...") + toks.count_per_doc("…")
    return {
        "gopher_words": words_.astype(np.int64),
        "gopher_tokens": n_tok.astype(np.int64),
        "gopher_mean_word_length": ratio(per_owner_sum(own, lengths * ~symbol, n), words_),
        "gopher_hash_ratio": ratio(hashes, n_tok),
        "gopher_ellipsis_ratio": ratio(ellipses, n_tok),
        "gopher_bullet_lines_ratio": ratio(per_owner_sum(line_own, bullets, n), n_lines),
        "gopher_ellipsis_lines_ratio": ratio(per_owner_sum(line_own, ell_end, n), n_lines),
        "gopher_alpha_words_ratio": ratio(per_owner_sum(own, alpha, n), n_tok),
        "gopher_stop_words": stop,
    }


def decide_gopher_quality(s: dict, cfg: GopherQualityConfig, reason: np.ndarray) -> None:
    w = s["gopher_words"]
    rules = [
        (cfg.min_doc_words, lambda t: w < t, "gopher_short_doc"),
        (cfg.max_doc_words, lambda t: w > t, "gopher_long_doc"),
        (cfg.min_avg_word_length, lambda t: s["gopher_mean_word_length"] < t, "gopher_below_avg_word_length"),
        (cfg.max_avg_word_length, lambda t: s["gopher_mean_word_length"] > t, "gopher_above_avg_word_length"),
        (cfg.max_symbol_word_ratio, lambda t: s["gopher_hash_ratio"] > t, "gopher_too_many_hashes"),
        (cfg.max_symbol_word_ratio, lambda t: s["gopher_ellipsis_ratio"] > t, "gopher_too_many_ellipsis"),
        (cfg.max_bullet_lines_ratio, lambda t: s["gopher_bullet_lines_ratio"] > t, "gopher_too_many_bullets"),
        (cfg.max_ellipsis_lines_ratio, lambda t: s["gopher_ellipsis_lines_ratio"] > t, "gopher_too_many_end_ellipsis"),
        (cfg.min_alpha_words_ratio, lambda t: s["gopher_alpha_words_ratio"] < t, "gopher_below_alpha_threshold"),
        (cfg.min_stop_words, lambda t: s["gopher_stop_words"] < t, "gopher_too_few_stop_words"),
    ]
    for thr, test, name in rules:
        if thr:  # datatrove: a 0 or null threshold disables the rule
            name_first_reason(reason, test(thr), name)
