"""The quality rules' fast paths against the plain definitions they replace: the compiled n-gram
counts (datatrove's most-common and greedy duplicate n-grams), the plain line splits and the
per-chunk character counts."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pyarrow as pa

from stages.filters import kernels
from stages.filters.text_arrays import SPLITLINES, split_line_runs, split_lines, tokenize_docs


def datatrove_top_chars(tokens: list[str], n: int) -> int:
    grams = [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def datatrove_duplicate_chars(tokens: list[str], n: int) -> int:
    seen, repeated, i = set(), 0, 0
    while i < len(tokens) - n + 1:
        gram = "".join(tokens[i : i + n])
        if gram in seen:
            repeated += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated


def test_ngram_kernel_matches_datatrove_definitions():
    rng = random.Random(7)
    # runs of one letter each, so that joined n-grams compare exactly as token sequences do
    vocab = ["a", "bb", "ccc", "d", "eeeee"]
    docs = [[rng.choice(vocab[: rng.randint(1, 5)]) for _ in range(rng.randint(0, 40))] for _ in range(300)]
    docs += [["a", "bb"] * 12, ["ccc"] * 11, []]
    ids_of = {t: i for i, t in enumerate(vocab)}
    flat = [t for d in docs for t in d]
    ids = np.array([ids_of[t] for t in flat], np.uint64)
    cum = np.concatenate([[0], np.cumsum([len(t) for t in flat])]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    top, dup = kernels.ngram_chars(ids, cum, offsets)
    for d, doc in enumerate(docs):
        assert [top[n - 2, d] for n in range(2, 5)] == [datatrove_top_chars(doc, n) for n in range(2, 5)], doc
        assert [dup[n - 5, d] for n in range(5, 11)] == [datatrove_duplicate_chars(doc, n) for n in range(5, 11)], doc


TEXTS = ["a\nb\n\n\nc\n", "\n\nx", "one\r\ntwo\rthree\u2028four\x0bfive\n", "", "\n", "only", "p\n\nq\n\n"]


def test_line_splits_equal_their_definitions():
    arr = pa.array(TEXTS)
    lines, offsets = split_lines(arr, SPLITLINES, drop_trailing_empty=True)
    flat = lines.to_pylist()
    assert [flat[offsets[i] : offsets[i + 1]] for i in range(len(TEXTS))] == [t.splitlines() for t in TEXTS]
    plain = pa.array([t for t in TEXTS if "\r" not in t and "\u2028" not in t and "\x0b" not in t])
    lines, offsets = split_lines(plain, SPLITLINES, drop_trailing_empty=True)
    flat = lines.to_pylist()
    assert [flat[offsets[i] : offsets[i + 1]] for i in range(len(plain))] == [t.splitlines() for t in plain.to_pylist()]
    runs, offsets = split_line_runs(arr)
    flat = runs.to_pylist()
    assert [flat[offsets[i] : offsets[i + 1]] for i in range(len(TEXTS))] == [re.split(r"\n+", t) for t in TEXTS]


def test_character_counts_from_chunks_equal_str_count():
    texts = ["#a ## b#", ".... ...... a...b.. .", "…... …\n...", "x..\n.y", "none here"]
    toks = tokenize_docs(pa.array(texts))
    for pattern in ("#", "...", "…"):
        assert toks.count_per_doc(pattern).tolist() == [t.count(pattern) for t in texts], pattern
