"""C4's rules (Raffel et al. 2020).

Line removal: no terminal punctuation, < 3 words, "javascript", cookie/terms boilerplate, words
> 1000 characters, Wikipedia citation marks. Document removal: "lorem ipsum", curly brackets,
< 5 sentences. Line removal rewrites ``text``; the original length and the number of removed
lines are kept as attributes. Lines are ``str.splitlines()`` lines and sentences are spaCy
sentencizer sentences, as in datatrove.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import StrictModel
from stages.filters import kernels, words
from stages.filters.text_arrays import Tokens, name_first_reason, np_of, owner, per_owner_sum

CITATION = r"\[\d*\]|\[edit\]|\[citation needed\]"
POLICY = "terms of use|privacy policy|cookie policy|uses cookies|use of cookies|use cookies"
SENTENCE_PUNCT = pa.array(sorted(words.SENTENCE_PUNCT), pa.string())
IS_PUNCT_TOKEN = r"^\p{P}+$"  # spaCy's is_punct: every character is Unicode punctuation


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


SCORE_COLUMNS: dict[str, pa.DataType] = {
    "original_length": pa.int64(),
    "c4_lines_removed": pa.int64(),
    "c4_sentences": pa.int64(),
}


def sentence_counts(batch: words.TokenBatch) -> np.ndarray:
    """Sentences per item as spaCy's sentencizer splits them: a new sentence starts at a
    non-punctuation token whose last non-punctuation-or-sentence-end predecessor is a
    sentence-end token ('.', '!', '?', ...)."""
    if len(batch.ids) == 0:
        return np.zeros(len(batch.offsets) - 1, np.int64)
    is_end = np_of(pc.is_in(batch.vocab, value_set=SENTENCE_PUNCT))
    is_punct = np_of(pc.match_substring_regex(batch.vocab, IS_PUNCT_TOKEN))
    kind = np.where(is_end, 2, np.where(is_punct, 0, 1)).astype(np.int8)
    return kernels.sentence_counts(kind, batch.ids, batch.offsets.astype(np.int64))


def _substring_rules(cleaned: pa.Array, candidates: np.ndarray, cfg: C4Config) -> tuple[np.ndarray, ...]:
    """The lorem-ipsum, javascript, curly-bracket and policy line tests (enabled ones), run only
    on ``candidates`` (the lines the earlier tests kept; the others are removed whatever these
    say), and only on those that one combined search finds to hold any of the phrases."""
    n = len(cleaned)
    rules = [  # (enabled, as a regex, the exact test)
        (cfg.filter_lorem_ipsum, "lorem ipsum", lambda a: pc.match_substring(a, "lorem ipsum")),
        (cfg.filter_javascript, "javascript", lambda a: pc.match_substring(a, "javascript")),
        (cfg.filter_curly_bracket, r"\{", lambda a: pc.match_substring(a, "{")),
        (cfg.filter_policy, POLICY, lambda a: pc.match_substring_regex(a, POLICY)),
    ]
    flags = [np.zeros(n, bool) for _ in rules]
    patterns = [regex for on, regex, _ in rules if on]
    if not patterns or len(candidates) == 0:
        return tuple(flags)
    # lower-cased as the rules are defined ("{" is its own lower case)
    lower = pc.utf8_lower(cleaned.take(pa.array(candidates, pa.int64())))
    hit = np.flatnonzero(np_of(pc.match_substring_regex(lower, "|".join(patterns))))
    if len(hit) == 0:
        return tuple(flags)
    lower_hit = lower.take(pa.array(hit, pa.int64()))
    for (on, _, test), out in zip(rules, flags):
        if on:
            out[candidates[hit]] = np_of(test(lower_hit))
    return tuple(flags)


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
    # str.split() words per line: the whitespace chunks the tokenizer already split the lines into
    chunks = toks.batch
    chunk_len = np_of(pc.utf8_length(chunks.chunks), np.int64) if len(chunks.chunks) else np.zeros(0, np.int64)
    chunk_line = owner(chunks.chunk_offsets)
    n_words = np.bincount(chunk_line, weights=chunks.per_chunk(chunk_len > 0), minlength=n_lines)
    cleaned = pc.replace_substring_regex(stripped, CITATION, "") if cfg.remove_citations else stripped

    def flag(arr):
        return np_of(arr) if n_lines else np.zeros(0, bool)

    too_long = (np.bincount(chunk_line, weights=chunks.per_chunk(chunk_len > cfg.max_word_length), minlength=n_lines) > 0) if cfg.max_word_length != -1 else np.zeros(n_lines, bool)
    terminal = flag(pc.and_(pc.match_substring_regex(cleaned, r"[.?!\"']$"), pc.invert(pc.ends_with(cleaned, "..."))))
    no_punct = ~terminal if cfg.filter_no_terminal_punct else np.zeros(n_lines, bool)
    few = n_words < cfg.min_words_per_line
    reached = ~too_long & ~no_punct & ~few
    lorem, js, curly, policy = _substring_rules(cleaned, np.flatnonzero(reached), cfg)
    # datatrove's per-line order: each test only sees lines that passed the ones before
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


def decide_c4(s: dict, doc_reason: np.ndarray, cfg: C4Config, reason: np.ndarray) -> None:
    has = doc_reason != None  # noqa: E711
    reason[(reason == None) & has] = doc_reason[(reason == None) & has]  # noqa: E711
    if cfg.min_num_sentences != -1:
        name_first_reason(reason, s["c4_sentences"] < cfg.min_num_sentences, "c4_too_few_sentences")
