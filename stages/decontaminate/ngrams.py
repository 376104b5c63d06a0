"""Word n-grams of evaluation text, hashed into a compact sorted index, and fast lookup.

Words are GPT-3's: lowercased text with Unicode punctuation and symbols removed, split on
whitespace. Every word that appears in the evaluation sets gets an id (its position in the
index's vocabulary); a training word outside the vocabulary cannot be part of a matching n-gram,
so n-grams that contain one are never looked up. A k-gram is a 64-bit hash of its word ids, and
the index is a sorted ``uint64`` array (8 bytes per distinct n-gram) plus, per n-gram, the
evaluation examples it came from (CSR arrays). All of it is numpy/Arrow, so one worker checks a
whole batch of documents with a few vectorised passes, and the slow per-document path (which
finds character spans for the report and for redaction) runs only on the rare matching documents.

A second kind of index, Dolma's paragraph-level exact match (``kind="paragraph"``), holds one hash
per evaluation paragraph (a line of a context or choice, as normalised words, at least
``min_words`` long); a training paragraph (a line) matches when its whole word sequence equals
one. It catches copied passages whose lines are shorter than ``n`` words (lists, dialogue,
verse) and never flags an overlap that is only part of a paragraph.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PUNCTUATION = r"[\p{P}\p{S}]"
_MUL = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TOKEN = re.compile(r"\S+")


def normalize(texts: pa.Array) -> pa.Array:
    """Lowercase and strip punctuation/symbols (the text words are cut from)."""
    lowered = pc.utf8_lower(texts)
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(lowered, PUNCTUATION, ""))


def split_words(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(flat array of words, offsets[len(texts)+1]) for an array of strings (nulls count as empty)."""
    lists = pc.utf8_split_whitespace(normalize(pc.fill_null(texts, "")))
    words = pc.list_flatten(lists)
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    return words, offsets


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def kgram_hashes(ids: np.ndarray, k: int) -> np.ndarray:
    """Hash of every window of ``k`` consecutive word ids (len(ids) - k + 1 values)."""
    m = len(ids) - k + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = _mix(ids.astype(np.uint64) + _MUL)
        h = mixed[:m].copy()
        for j in range(1, k):
            h = h * _MUL + mixed[j : j + m]
        return _mix(h ^ np.uint64(k))


def paragraph_hashes(ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Hash of each segment's whole word-id sequence (segment i = ids[offsets[i]:offsets[i+1]]):
    ``mix(sum_j mix(id_j + C) * C**j  xor  (len << 32 | 0xD01A))``."""
    lengths = np.diff(offsets)
    out = np.zeros(len(lengths), dtype=np.uint64)
    if len(ids):
        with np.errstate(over="ignore"):
            pos = np.arange(len(ids), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
            powers = _powers_of_mul(int(lengths.max()))
            terms = _mix(ids.astype(np.uint64) + _MUL) * powers[pos]
            nonempty = lengths > 0
            out[nonempty] = np.add.reduceat(terms, offsets[:-1][nonempty])
    with np.errstate(over="ignore"):
        return _mix(out ^ ((lengths.astype(np.uint64) << np.uint64(32)) | np.uint64(0xD01A)))


_POWERS = np.ones(1, dtype=np.uint64)


def _powers_of_mul(n: int) -> np.ndarray:
    """C**j mod 2**64 for j < n (cached; extended by doubling)."""
    global _POWERS
    with np.errstate(over="ignore"):
        while len(_POWERS) < n:
            _POWERS = np.concatenate([_POWERS, _POWERS * (_POWERS[-1] * _MUL)])  # C**(k + j) = C**j * C**k
    return _POWERS[:n]


def paragraphs_of(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Every line of every text: (flat array of lines, per-text offsets into it)."""
    lists = pc.split_pattern(pc.fill_null(texts, ""), "\n")
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    return pc.list_flatten(lists), offsets - offsets[0]


def valid_windows(ids: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    """Mask of windows that lie inside one document and contain no unknown word (id 0)."""
    m = len(ids) - k + 1
    if m <= 0:
        return np.zeros(0, dtype=bool)
    unknown = np.concatenate([[0], np.cumsum(ids == 0)])
    ok = (unknown[k : k + m] - unknown[:m]) == 0
    doc_of = np.searchsorted(offsets, np.arange(len(ids)), side="right") - 1
    return ok & (doc_of[:m] == doc_of[k - 1 : k - 1 + m])


@dataclass
class NgramIndex:
    """The shared index: vocabulary, sorted n-gram hashes, and which examples each came from."""

    n: int
    lengths: tuple[int, ...]  # window lengths looked up: n, plus whole short texts (min_words..n-1)
    vocab: pa.Array  # string; word id = position + 1 (0 = not an evaluation word)
    hashes: np.ndarray  # uint64, sorted, unique
    example_offsets: np.ndarray  # int32 (int64 past 2**31 pairs), len(hashes) + 1
    example_index: np.ndarray  # int32, into examples
    examples: list[tuple[str, str]]  # (task, example id)
    stats: dict[str, Any]
    bitmap: Optional[np.ndarray] = None  # uint64 words: a one-hash Bloom filter in front of the sorted array
    kind: str = "ngram"  # or "paragraph" (then n = the fewest words a paragraph needs to count)

    def __post_init__(self) -> None:
        if self.bitmap is None:
            self.bitmap = make_bitmap(self.hashes)
        self._shift = np.uint64(64 - int(np.log2(len(self.bitmap) * 64)))

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def build(cls, tasks: list[Any], n: int = 13, min_words: Optional[int] = 8, max_examples_per_ngram: int = 10) -> "NgramIndex":
        examples, texts, owner, per_task = _example_texts(tasks)
        words, offsets = split_words(pa.array(texts, pa.string()))
        vocab = pc.unique(words)
        vocab = vocab.filter(pc.not_equal(vocab, ""))
        ids = word_ids(words, vocab)
        lengths = np.diff(offsets)
        owner_arr = np.asarray(owner, dtype=np.int64)
        pair_hashes, pair_owner = [], []
        # every n-gram of texts with >= n words
        valid = valid_windows(ids, offsets, n)
        h = kgram_hashes(ids, n)
        text_of = np.searchsorted(offsets, np.arange(len(h)), side="right") - 1
        pair_hashes.append(h[valid])
        pair_owner.append(owner_arr[text_of[valid]])
        # whole texts shorter than n words but long enough to mean something
        short_lengths = []
        if min_words is not None and min_words < n:
            is_context = np.zeros(len(texts), dtype=bool)
            first = 0
            for task in tasks:  # short whole-text matches only for contexts: short choices are common phrases
                for ex in (*task.examples, *task.fewshot):
                    is_context[first] = True
                    first += 1 + len(ex.choices)
            for k in range(min_words, n):
                sel = np.nonzero((lengths == k) & is_context)[0]
                if len(sel) == 0:
                    continue
                short_lengths.append(k)
                hk = kgram_hashes(ids, k)
                starts = offsets[sel]
                pair_hashes.append(hk[starts])
                pair_owner.append(owner_arr[sel])
        hashes = np.concatenate(pair_hashes) if pair_hashes else np.zeros(0, np.uint64)
        owners = np.concatenate(pair_owner) if pair_owner else np.zeros(0, np.int64)
        stats = {"n": n, "min_words": min_words, "texts": len(texts)}
        return cls._from_pairs(hashes, owners, examples, per_task, vocab, max_examples_per_ngram, stats, n, tuple([n, *short_lengths]))

    @classmethod
    def build_paragraphs(cls, tasks: list[Any], min_words: int = 13, max_examples_per_ngram: int = 10) -> "NgramIndex":
        """Dolma-style: one entry per evaluation paragraph (a line of a context or choice) of at
        least ``min_words`` normalised words."""
        examples, texts, owner, per_task = _example_texts(tasks)
        lines, line_offsets = paragraphs_of(pa.array(texts, pa.string()))
        words, offsets = split_words(lines)
        vocab = pc.unique(words)
        vocab = vocab.filter(pc.not_equal(vocab, ""))
        ids = word_ids(words, vocab)
        keep = np.diff(offsets) >= min_words
        text_of_line = np.searchsorted(line_offsets, np.arange(len(lines)), side="right") - 1
        hashes = paragraph_hashes(ids, offsets)[keep]
        owners = np.asarray(owner, dtype=np.int64)[text_of_line[keep]]
        stats = {"min_words": min_words, "texts": len(texts), "paragraphs": int(len(lines)), "paragraphs_indexed": int(keep.sum())}
        return cls._from_pairs(hashes, owners, examples, per_task, vocab, max_examples_per_ngram, stats, min_words, (), kind="paragraph")

    @classmethod
    def _from_pairs(cls, hashes, owners, examples, per_task, vocab, max_examples_per_ngram, stats, n, lengths, kind="ngram") -> "NgramIndex":
        """(hash, example) pairs -> the sorted hash array and its CSR lists of examples."""
        # distinct (hash, example) pairs, then drop n-grams shared by too many examples
        pairs = _unique_pairs(hashes, owners.astype(np.uint64))
        uniq, counts = np.unique(pairs[:, 0], return_counts=True)
        keep = counts <= max_examples_per_ngram
        kept_counts = counts[keep]
        example_offsets = np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int32 if len(pairs) < 2**31 else np.int64)
        # the pairs of the kept n-grams, in order (pairs are sorted by hash: each n-gram's are contiguous)
        take = np.flatnonzero(np.repeat(keep, counts))
        example_index = pairs[take, 1].astype(np.int32)
        indexed = np.zeros(len(examples), dtype=bool)
        indexed[example_index] = True
        for name in per_task:
            sel = np.array([t == name for t, _ in examples])
            per_task[name]["examples_indexed"] = int(indexed[sel].sum())
        stats = {
            "kind": kind,
            **stats,
            "max_examples_per_ngram": max_examples_per_ngram,
            "vocab_words": len(vocab),
            "ngrams": int(len(uniq)),
            "ngrams_kept": int(keep.sum()),
            "ngrams_ignored_too_common": int((~keep).sum()),
            "tasks": per_task,
        }
        index = cls(n, lengths, vocab, uniq[keep].astype(np.uint64), example_offsets, example_index, examples, stats, kind=kind)
        index.stats["memory_bytes"] = index.nbytes
        return index

    @property
    def nbytes(self) -> int:
        return int(self.hashes.nbytes + self.example_offsets.nbytes + self.example_index.nbytes + self.vocab.nbytes + self.bitmap.nbytes)

    def maybe_contains(self, h: np.ndarray) -> np.ndarray:
        bit = h >> self._shift
        return ((self.bitmap[bit >> np.uint64(6)] >> (bit & np.uint64(63))) & np.uint64(1)).astype(bool)

    # -- lookup ----------------------------------------------------------------------------------
    def hits(self, ids: np.ndarray, offsets: np.ndarray) -> list[tuple[np.ndarray, int, np.ndarray]]:
        """For each window length: (start positions of matching windows, length, index rows)."""
        out = []
        for k in self.lengths:
            h = kgram_hashes(ids, k)
            if len(h) == 0:
                continue
            where = np.nonzero(self.maybe_contains(h))[0]  # ~1-3% of windows survive the bitmap
            if len(where) == 0:
                continue
            pos = np.searchsorted(self.hashes, h[where])
            pos[pos == len(self.hashes)] = 0
            found = self.hashes[pos] == h[where]
            if not found.any():
                continue
            found &= valid_windows(ids, offsets, k)[where]
            if found.any():
                out.append((where[found], k, pos[found]))
        return out

    def lookup(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``h`` found in the index, their index rows)."""
        where = np.nonzero(self.maybe_contains(h))[0] if len(h) else np.zeros(0, np.int64)
        if len(where) == 0 or len(self.hashes) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pos = np.searchsorted(self.hashes, h[where])
        pos[pos == len(self.hashes)] = 0
        found = self.hashes[pos] == h[where]
        return where[found], pos[found]

    def paragraph_hits(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray]:
        """Paragraph index: (text of each matching line, index row, all lines, per-text line offsets)."""
        lines, line_offsets = paragraphs_of(texts)
        words, offsets = split_words(lines)
        ids = word_ids(words, self.vocab)
        lengths = np.diff(offsets)
        cum = np.concatenate([[0], np.cumsum(ids == 0)])
        unknown = cum[offsets[1:]] - cum[offsets[:-1]]
        candidate = np.nonzero((lengths >= self.n) & (unknown == 0))[0]
        where, rows = self.lookup(paragraph_hashes(ids, offsets)[candidate])
        line = candidate[where]
        return np.searchsorted(line_offsets, line, side="right") - 1, rows, line, line_offsets

    def examples_of(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros(0, np.int32)
        return np.unique(np.concatenate([self.example_index[self.example_offsets[r] : self.example_offsets[r + 1]] for r in rows]))

    # -- storage: a handful of plain files, memory-mappable where local ------------------------
    def save(self, storage: Any, folder: str) -> None:
        from pipeline import storage as st

        def npy(a: np.ndarray) -> bytes:
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            return buf.getvalue()

        storage.write_bytes_atomic(st.join(folder, "hashes.npy"), npy(self.hashes))
        storage.write_bytes_atomic(st.join(folder, "example_offsets.npy"), npy(self.example_offsets))
        storage.write_bytes_atomic(st.join(folder, "example_index.npy"), npy(self.example_index))
        storage.write_bytes_atomic(st.join(folder, "bitmap.npy"), npy(self.bitmap))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, pa.schema([("word", pa.string())])) as w:
            w.write_table(pa.table({"word": self.vocab}))
        storage.write_bytes_atomic(st.join(folder, "vocab.arrow"), sink.getvalue().to_pybytes())
        meta = {"n": self.n, "lengths": list(self.lengths), "examples": self.examples, "stats": self.stats, "kind": self.kind}
        storage.write_bytes_atomic(st.join(folder, "index.json"), json.dumps(meta).encode())

    @classmethod
    def load(cls, storage: Any, folder: str) -> "NgramIndex":
        from pipeline import storage as st

        def arr(name: str) -> np.ndarray:
            uri = st.join(folder, name)
            if not st.is_remote(uri):
                return np.load(uri, mmap_mode="r")  # shared through the page cache by all workers
            return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)

        vocab_uri = st.join(folder, "vocab.arrow")
        if st.is_remote(vocab_uri):
            vocab = pa.ipc.open_file(pa.BufferReader(storage.read_bytes(vocab_uri))).read_all().column("word").combine_chunks()
        else:
            vocab = pa.ipc.open_file(pa.memory_map(vocab_uri)).read_all().column("word").combine_chunks()
        meta = json.loads(storage.read_bytes(st.join(folder, "index.json")))
        return cls(meta["n"], tuple(meta["lengths"]), vocab, arr("hashes.npy"), arr("example_offsets.npy"), arr("example_index.npy"),
                   [tuple(e) for e in meta["examples"]], meta["stats"], arr("bitmap.npy"), meta.get("kind", "ngram"))


def _example_texts(tasks: list[Any]) -> tuple[list[tuple[str, str]], list[str], list[int], dict[str, dict[str, int]]]:
    """(examples as (task, id), every text of every example, the example of each text, per-task counts)."""
    examples: list[tuple[str, str]] = []
    texts: list[str] = []
    owner: list[int] = []
    per_task: dict[str, dict[str, int]] = {}
    for task in tasks:
        for ex in (*task.examples, *task.fewshot):
            examples.append((task.name, ex.id))
            for t in ex.texts():
                texts.append(t)
                owner.append(len(examples) - 1)
        per_task[task.name] = {"examples": len(task.examples) + len(task.fewshot)}
    return examples, texts, owner, per_task


def make_bitmap(hashes: np.ndarray, bits_per_entry: int = 32) -> np.ndarray:
    """A one-hash Bloom filter over the top bits of each hash (false positives ~ 1/bits_per_entry)."""
    log2 = max(16, int(np.ceil(np.log2(max(len(hashes), 1) * bits_per_entry))))
    words = np.zeros(2 ** (log2 - 6), dtype=np.uint64)
    bit = hashes.astype(np.uint64) >> np.uint64(64 - log2)
    np.bitwise_or.at(words, bit >> np.uint64(6), np.uint64(1) << (bit & np.uint64(63)))
    return words


def word_ids(words: pa.Array, vocab: pa.Array) -> np.ndarray:
    """Word id per word: position in the vocabulary + 1, or 0 for a word the eval sets never use."""
    idx = pc.index_in(words, value_set=vocab)
    return np.asarray(pc.fill_null(pc.add(idx, 1), 0), dtype=np.int64)


def token_spans(text: str) -> tuple[list[tuple[int, int]], pa.Array]:
    """Character span and normalised word of every word of one text (for the slow path)."""
    spans, raw = [], []
    for m in _TOKEN.finditer(text):
        spans.append((m.start(), m.end()))
        raw.append(m.group())
    if not raw:
        return [], pa.array([], pa.string())
    norm = normalize(pa.array(raw, pa.string()))
    keep = np.asarray(pc.not_equal(norm, ""), dtype=bool)
    return [s for s, k in zip(spans, keep) if k], norm.filter(pa.array(keep))


def _unique_pairs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The distinct rows of ``[first, second]`` (two uint64 columns), sorted by first, then second:
    ``np.unique(np.stack(...), axis=0)`` without its row-as-void sort (several times slower)."""
    if len(first) == 0:
        return np.zeros((0, 2), np.uint64)
    order = np.lexsort((second, first))
    a, b = first[order], second[order]
    new = np.ones(len(a), dtype=bool)
    new[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return np.stack([a[new], b[new]], axis=1)
