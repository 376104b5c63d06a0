"""Quality rules: Gopher quality, Gopher repetition, C4 and FineWeb, scored then decided.

Every rule family first *scores* a whole batch into typed attribute columns (ratios, counts)
and then *decides* from thresholds, so each rejected row says which rule fired and the values
that made it fire. Defaults are the published values, as implemented by datatrove (the
reference we measure agreement against, see BENCHMARKS.md):

* Gopher quality (Rae et al. 2021, Table A1) and Gopher repetition.
* C4 (Raffel et al. 2020): line removal (no terminal punctuation, < 3 words, "javascript",
  cookie/terms boilerplate, words > 1000 characters, Wikipedia citation marks), document
  removal ("lorem ipsum", curly brackets, < 5 sentences). Line removal rewrites ``text``; the
  original length and the number of removed lines are kept as attributes.
* FineWeb (Penedo et al. 2024): line punctuation ratio, short-line ratio, duplicated-line
  characters, list-like documents (newlines per word) -- on C4's output when C4 is enabled,
  as in the FineWeb recipe.

The scorers run on whole Arrow batches: splitting, regex tests and lengths are Arrow kernels,
counting is numpy over flat token/line arrays; only the spaCy affix rules (words.py) and the
greedy duplicate-n-gram walk (over repeated positions only) run per item in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import StrictModel
from stages.filters import words

# Python's str.isspace() characters, for RE2 (whose \s is ASCII only).
WS = r"[\t\n\x0b\x0c\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]"
# str.splitlines() boundaries.
SPLITLINES = r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x{85}\x{2028}\x{2029}]"
SYMBOL_TOKEN = "^" + words.re2_class(words.PUNCTUATION_SET) + "+$"
TERMINAL_END = words.re2_class(words.TERMINAL_PUNCTUATION) + "$"
CITATION = r"\[\d*\]|\[edit\]|\[citation needed\]"
POLICY = "terms of use|privacy policy|cookie policy|uses cookies|use of cookies|use cookies"
SENTENCE_PUNCT = pa.array(sorted(words.SENTENCE_PUNCT), pa.string())
IS_PUNCT_TOKEN = r"^\p{P}+$"  # spaCy's is_punct: every character is Unicode punctuation


# --------------------------------------------------------------------------------------------
# configs
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


class C4Config(StrictModel):
    """C4's line and document rules (lines are ``str.splitlines()`` lines, as in C4)."""

    enabled: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = Field(default=5, ge=-1, description="-1 disables")
    min_words_per_line: int = Field(default=3, ge=-1, description="-1 disables")
    max_word_length: int = Field(default=1000, ge=-1, description="-1 disables")
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebConfig(StrictModel):
    """FineWeb's rules; run on C4's output when C4 is enabled (the FineWeb recipe)."""

    enabled: bool = True
    line_punct_thr: float = Field(default=0.12, ge=0, le=1)
    line_punct_exclude_zero: bool = False
    short_line_thr: float = Field(default=0.67, ge=0, le=1)
    short_line_length: int = Field(default=30, ge=0)
    char_duplicates_ratio: float = Field(default=0.01, ge=0, le=1)
    new_line_ratio: float = Field(default=0.3, ge=0)


class QualityConfig(StrictModel):
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    max_doc_chars: int = Field(
        default=2_000_000, ge=1,
        description="longer documents are dropped as quality_doc_too_long without scoring (bounds memory and time)",
    )


# --------------------------------------------------------------------------------------------
# helpers over flat (concatenated) arrays
def np_of(arr: pa.Array, dtype=None) -> np.ndarray:
    out = arr.to_numpy(zero_copy_only=False)
    return out.astype(dtype) if dtype is not None and out.dtype != dtype else out


def owner(offsets: np.ndarray) -> np.ndarray:
    """For offsets (n+1), the index of the owning element of each flat item."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def per_owner_sum(own: np.ndarray, values, n: int) -> np.ndarray:
    return np.bincount(own, weights=values, minlength=n) if len(own) else np.zeros(n)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def split_lines(texts: pa.Array, pattern: str, drop_trailing_empty: bool) -> tuple[pa.Array, np.ndarray]:
    """Flat lines and per-text offsets. ``drop_trailing_empty`` gives str.splitlines() semantics."""
    lists = pc.split_pattern_regex(texts, pattern)
    flat = lists.flatten()
    offsets = words.list_offsets(lists)
    if not drop_trailing_empty or len(flat) == 0:
        return flat, offsets
    last = offsets[1:] - 1
    lengths = np_of(pc.utf8_length(flat))
    drop = np.zeros(len(flat), bool)
    has = offsets[1:] > offsets[:-1]
    drop[last[has]] = lengths[last[has]] == 0
    keep = ~drop
    new_counts = np.bincount(owner(offsets)[keep], minlength=len(offsets) - 1)
    return flat.filter(pa.array(keep)), np.concatenate([[0], np.cumsum(new_counts)])


def duplicate_stats(items: pa.Array, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per text: number of items equal to an earlier item of the same text, and their characters
    (datatrove's find_duplicates)."""
    n = len(offsets) - 1
    if len(items) == 0:
        return np.zeros(n), np.zeros(n)
    ids = np_of(pc.dictionary_encode(items).indices, np.int64)
    own = owner(offsets)
    key = own * (int(ids.max()) + 1) + ids
    _, first = np.unique(key, return_index=True)
    dup = np.ones(len(key), bool)
    dup[first] = False
    lengths = np_of(pc.utf8_length(items), np.int64)
    return per_owner_sum(own, dup, n), per_owner_sum(own, lengths * dup, n)


def occurrence_counts(keys: np.ndarray) -> np.ndarray:
    """How often each element's value occurs in the array (a hash table, not a sort)."""
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    codes, _ = pd.factorize(keys)
    return np.bincount(codes)[codes]


# --------------------------------------------------------------------------------------------
@dataclass
class Tokens:
    """Word tokens of a batch, by line and by document, with per-vocabulary attributes."""

    batch: words.TokenBatch  # tokens of the splitlines() lines
    doc_offsets: np.ndarray  # token offsets per document
    lines: pa.Array  # splitlines() lines, flat
    doc_line_offsets: np.ndarray

    @property
    def ids(self) -> np.ndarray:
        return self.batch.ids

    @property
    def line_offsets(self) -> np.ndarray:
        return self.batch.offsets

    def vocab_flag(self, pattern: str) -> np.ndarray:
        """A regex test per vocabulary entry, gathered per token."""
        vocab = self.batch.vocab
        return self.batch.per_token(np_of(pc.match_substring_regex(vocab, pattern))) if len(vocab) else np.zeros(0, bool)

    def lengths(self) -> np.ndarray:
        vocab = self.batch.vocab
        return self.batch.per_token(np_of(pc.utf8_length(vocab), np.int64)) if len(vocab) else np.zeros(0, np.int64)


def tokenize_docs(texts: pa.Array) -> Tokens:
    lines, doc_line_offsets = split_lines(texts, SPLITLINES, drop_trailing_empty=True)
    batch = words.tokenize(lines)
    return Tokens(batch, batch.offsets[doc_line_offsets], lines, doc_line_offsets)


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
    hashes = np_of(pc.count_substring(texts, "#"), np.float64)
    ellipses = np_of(pc.count_substring(texts, "..."), np.float64) + np_of(pc.count_substring(texts, "…"), np.float64)
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


def sentence_counts(batch: words.TokenBatch) -> np.ndarray:
    """Sentences per item as spaCy's sentencizer splits them: a new sentence starts at a
    non-punctuation token whose last non-punctuation-or-sentence-end predecessor is a
    sentence-end token ('.', '!', '?', ...)."""
    offsets = batch.offsets
    items = len(offsets) - 1
    if len(batch.ids) == 0:
        return np.zeros(items, np.int64)
    is_end = batch.per_token(np_of(pc.is_in(batch.vocab, value_set=SENTENCE_PUNCT)))
    is_punct = batch.per_token(np_of(pc.match_substring_regex(batch.vocab, IS_PUNCT_TOKEN)))
    code = np.where(is_end, 2, np.where(is_punct, 0, 1))
    idx = np.arange(len(code))
    last = np.maximum.accumulate(np.where(code > 0, idx, -1))
    prev = np.concatenate([[-1], last[:-1]])
    own = owner(offsets)
    in_item = prev >= offsets[own]
    starts = (code == 1) & in_item & (code[np.maximum(prev, 0)] == 2)
    n_tok = np.diff(offsets)
    return np.where(n_tok > 0, 1 + np.bincount(own, weights=starts, minlength=items), 0).astype(np.int64)


@dataclass
class C4Result:
    scores: dict[str, np.ndarray]
    text: pa.Array  # after line removal
    words: np.ndarray  # word tokens of the new text (for FineWeb)
    doc_reason: np.ndarray  # object: c4_lorem_ipsum / c4_curly_bracket / None


def score_c4(texts: pa.Array, toks: Tokens, text_len: np.ndarray, cfg: C4Config) -> C4Result:
    n = len(texts)
    lines = toks.lines
    line_off = toks.doc_line_offsets
    n_lines = len(lines)
    line_own = owner(line_off)
    stripped = pc.utf8_trim_whitespace(lines)
    ws_lists = pc.utf8_split_whitespace(stripped)
    ws_words = ws_lists.flatten()
    ws_own = owner(words.list_offsets(ws_lists))
    ws_len = np_of(pc.utf8_length(ws_words), np.int64) if len(ws_words) else np.zeros(0, np.int64)
    n_words = np.bincount(ws_own, weights=ws_len > 0, minlength=n_lines)
    cleaned = pc.replace_substring_regex(stripped, CITATION, "") if cfg.remove_citations else stripped
    lower = pc.utf8_lower(cleaned)

    def flag(arr):
        return np_of(arr) if n_lines else np.zeros(0, bool)

    too_long = (np.bincount(ws_own, weights=ws_len > cfg.max_word_length, minlength=n_lines) > 0) if cfg.max_word_length != -1 else np.zeros(n_lines, bool)
    terminal = flag(pc.and_(pc.match_substring_regex(cleaned, r"[.?!\"']$"), pc.invert(pc.ends_with(cleaned, "..."))))
    no_punct = ~terminal if cfg.filter_no_terminal_punct else np.zeros(n_lines, bool)
    few = n_words < cfg.min_words_per_line
    lorem = flag(pc.match_substring(lower, "lorem ipsum")) if cfg.filter_lorem_ipsum else np.zeros(n_lines, bool)
    js = flag(pc.match_substring(lower, "javascript")) if cfg.filter_javascript else np.zeros(n_lines, bool)
    curly = flag(pc.match_substring(cleaned, "{")) if cfg.filter_curly_bracket else np.zeros(n_lines, bool)
    policy = flag(pc.match_substring_regex(lower, POLICY)) if cfg.filter_policy else np.zeros(n_lines, bool)
    # datatrove's per-line order: each test only sees lines that passed the ones before
    reached = ~too_long & ~no_punct & ~few
    lorem_line = reached & lorem
    reached &= ~lorem
    reached &= ~js
    curly_line = reached & curly
    reached &= ~curly
    kept = reached & ~policy

    # sentences and word tokens of the kept lines, after citation removal
    line_tokens = np.diff(toks.line_offsets)
    line_sents = sentence_counts(toks.batch)
    if cfg.remove_citations and n_lines:
        changed = np.flatnonzero(np_of(pc.not_equal(cleaned, stripped)) & kept)
        if len(changed):
            sub = cleaned.take(pa.array(changed))
            sub_batch = words.tokenize(sub)
            line_tokens = line_tokens.copy()
            line_sents = line_sents.copy()
            line_tokens[changed] = np.diff(sub_batch.offsets)
            line_sents[changed] = sentence_counts(sub_batch)
    sentences = per_owner_sum(line_own, line_sents * kept, n).astype(np.int64)
    kept_words = per_owner_sum(line_own, line_tokens * kept, n).astype(np.int64)

    doc_reason = np.full(n, None, dtype=object)
    trigger = np.flatnonzero(lorem_line | curly_line)
    if len(trigger):
        owners_, first = np.unique(line_own[trigger], return_index=True)
        first_line = trigger[first]
        doc_reason[owners_] = np.where(lorem_line[first_line], "c4_lorem_ipsum", "c4_curly_bracket")

    kept_idx = np.flatnonzero(kept)
    kept_offsets = np.concatenate([[0], np.cumsum(np.bincount(line_own[kept_idx], minlength=n))]) if n_lines else np.zeros(n + 1, np.int64)
    kept_lines = cleaned.take(pa.array(kept_idx, pa.int64())) if n_lines else pa.array([], pa.string())
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(kept_offsets, pa.int32()), kept_lines), "\n")
    new_text = pc.utf8_trim_whitespace(joined)
    scores = {
        "original_length": text_len.astype(np.int64),
        "c4_lines_removed": (np.diff(line_off) - np.diff(kept_offsets)).astype(np.int64),
        "c4_sentences": sentences,
    }
    return C4Result(scores, new_text, kept_words, doc_reason)


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


# --------------------------------------------------------------------------------------------
# deciding
def _first(reason: np.ndarray, mask: np.ndarray, name: str) -> None:
    reason[(reason == None) & mask] = name  # noqa: E711 - elementwise on an object array


def decide_gopher_repetition(s: dict, cfg: GopherRepetitionConfig, reason: np.ndarray) -> None:
    for key in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac",
                "top_2_gram_frac", "top_3_gram_frac", "top_4_gram_frac", "dup_5_gram_frac", "dup_6_gram_frac",
                "dup_7_gram_frac", "dup_8_gram_frac", "dup_9_gram_frac", "dup_10_gram_frac"):
        thr = getattr(cfg, key)
        if thr is not None:
            _first(reason, s[f"gopher_{key}"] > thr, "gopher_" + key.replace("_frac", ""))


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
            _first(reason, test(thr), name)


def decide_c4(s: dict, doc_reason: np.ndarray, cfg: C4Config, reason: np.ndarray) -> None:
    has = doc_reason != None  # noqa: E711
    reason[(reason == None) & has] = doc_reason[(reason == None) & has]  # noqa: E711
    if cfg.min_num_sentences != -1:
        _first(reason, s["c4_sentences"] < cfg.min_num_sentences, "c4_too_few_sentences")


def decide_fineweb(s: dict, cfg: FineWebConfig, reason: np.ndarray) -> None:
    _first(reason, s["fineweb_lines"] == 0, "fineweb_empty")
    lp = s["fineweb_line_punct_ratio"]
    _first(reason, (lp < cfg.line_punct_thr) & ~((lp == 0) & cfg.line_punct_exclude_zero), "fineweb_line_punct_ratio")
    _first(reason, s["fineweb_short_line_ratio"] > cfg.short_line_thr, "fineweb_short_line_ratio")
    _first(reason, s["fineweb_char_dup_ratio"] > cfg.char_duplicates_ratio, "fineweb_char_dup_ratio")
    _first(reason, s["fineweb_list_ratio"] > cfg.new_line_ratio, "fineweb_list_ratio")


# --------------------------------------------------------------------------------------------
SCORE_COLUMNS: dict[str, pa.DataType] = {
    **{k: pa.float64() for k in (
        "gopher_dup_para_frac", "gopher_dup_para_char_frac", "gopher_dup_line_frac", "gopher_dup_line_char_frac",
        "gopher_top_2_gram_frac", "gopher_top_3_gram_frac", "gopher_top_4_gram_frac",
        *(f"gopher_dup_{k}_gram_frac" for k in range(5, 11)),
    )},
    "gopher_words": pa.int64(),
    "gopher_tokens": pa.int64(),
    "gopher_mean_word_length": pa.float64(),
    "gopher_hash_ratio": pa.float64(),
    "gopher_ellipsis_ratio": pa.float64(),
    "gopher_bullet_lines_ratio": pa.float64(),
    "gopher_ellipsis_lines_ratio": pa.float64(),
    "gopher_alpha_words_ratio": pa.float64(),
    "gopher_stop_words": pa.int64(),
    "original_length": pa.int64(),
    "c4_lines_removed": pa.int64(),
    "c4_sentences": pa.int64(),
    "fineweb_lines": pa.int64(),
    "fineweb_line_punct_ratio": pa.float64(),
    "fineweb_short_line_ratio": pa.float64(),
    "fineweb_char_dup_ratio": pa.float64(),
    "fineweb_list_ratio": pa.float64(),
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
        s = score_gopher_repetition(texts, toks, text_len, cfg.gopher_repetition)
        scores.update(s)
        decide_gopher_repetition(s, cfg.gopher_repetition, reason)
    if cfg.gopher_quality.enabled:
        s = score_gopher_quality(texts, toks, cfg.gopher_quality)
        scores.update(s)
        decide_gopher_quality(s, cfg.gopher_quality, reason)
    out_text = texts
    fine_text, fine_words = texts, np.diff(toks.doc_offsets)
    if cfg.c4.enabled:
        c4 = score_c4(texts, toks, text_len, cfg.c4)
        scores.update(c4.scores)
        decide_c4(c4.scores, c4.doc_reason, cfg.c4, reason)
        passed = reason == None  # noqa: E711
        out_text = pc.if_else(pa.array(passed), c4.text, texts) if n else texts
        fine_text, fine_words = c4.text, c4.words
    if cfg.fineweb.enabled:
        s = score_fineweb(fine_text, fine_words, cfg.fineweb)
        scores.update(s)
        decide_fineweb(s, cfg.fineweb, reason)
    return QualityResult(scores, reason, out_text)
