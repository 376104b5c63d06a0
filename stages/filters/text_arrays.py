"""A batch's texts as flat Arrow/numpy arrays: lines, word tokens and per-document sums.

The quality rules never loop over documents in Python: splitting, regex tests and lengths are
Arrow kernels over the whole batch, and per-document counts are numpy sums over the flat
(concatenated) line and token arrays, grouped by offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.filters import words

# str.splitlines() boundaries, for RE2.
SPLITLINES = r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x{85}\x{2028}\x{2029}]"


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


# Line separators of str.splitlines() other than "\n", as UTF-8 byte strings.
_RARE_LINE_BREAKS = (b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", "\x85".encode(), "\u2028".encode(), "\u2029".encode())


def _has_rare_line_breaks(texts: pa.Array) -> bool:
    r"""Whether any text holds a line separator other than "\n" (a substring search of the
    batch's bytes, much cheaper than a regex split)."""
    if texts.type != pa.string():
        return True  # not worth a second code path: take the regex split
    if len(texts) == 0 or texts.buffers()[2] is None:
        return False
    offsets = np.frombuffer(texts.buffers()[1], np.int32, len(texts) + 1, texts.offset * 4)
    data = texts.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_pybytes()
    return any(sep in data for sep in _RARE_LINE_BREAKS)


def _split(texts: pa.Array, pattern: str) -> pa.Array:
    r"""``split_pattern_regex(texts, pattern)``, with a plain (non-regex) split on "\n" where the
    result is the same: the regex split costs ~20x more."""
    if pattern == "\n" or (pattern == SPLITLINES and not _has_rare_line_breaks(texts)):
        return pc.split_pattern(texts, "\n")
    return pc.split_pattern_regex(texts, pattern)


def split_lines(texts: pa.Array, pattern: str, drop_trailing_empty: bool) -> tuple[pa.Array, np.ndarray]:
    """Flat lines and per-text offsets. ``drop_trailing_empty`` gives str.splitlines() semantics."""
    lists = _split(texts, pattern)
    flat = lists.flatten()
    offsets = words.list_offsets(lists)
    if not drop_trailing_empty or len(flat) == 0:
        return flat, offsets
    last = offsets[1:] - 1
    lengths = np_of(pc.utf8_length(flat))
    drop = np.zeros(len(flat), bool)
    has = offsets[1:] > offsets[:-1]
    drop[last[has]] = lengths[last[has]] == 0
    return _without(flat, offsets, drop)


def split_line_runs(texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
    r"""``split_pattern_regex(texts, r"\n+")`` (lines, runs of newlines as one break): a plain
    split on "\n" without the empty pieces between two breaks."""
    lists = pc.split_pattern(texts, "\n")
    flat = lists.flatten()
    offsets = words.list_offsets(lists)
    if len(flat) == 0:
        return flat, offsets
    inner = np.ones(len(flat), bool)
    inner[offsets[:-1][offsets[1:] > offsets[:-1]]] = False  # first piece of each text
    inner[offsets[1:][offsets[1:] > offsets[:-1]] - 1] = False  # last piece of each text
    drop = inner & (np_of(pc.utf8_length(flat)) == 0)
    return _without(flat, offsets, drop) if drop.any() else (flat, offsets)


def _without(flat: pa.Array, offsets: np.ndarray, drop: np.ndarray) -> tuple[pa.Array, np.ndarray]:
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


def name_first_reason(reason: np.ndarray, mask: np.ndarray, name: str) -> None:
    """Give rows in ``mask`` the drop reason ``name`` unless an earlier rule already named one."""
    reason[(reason == None) & mask] = name  # noqa: E711 - elementwise on an object array


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

    def count_per_doc(self, pattern: str) -> np.ndarray:
        """Non-overlapping occurrences of ``pattern`` (no whitespace or line break in it) per
        document: ``str.count`` of the text, summed over its whitespace chunks, each distinct
        chunk counted once."""
        chunks = self.batch.chunks
        n = len(self.doc_line_offsets) - 1
        if len(chunks) == 0:
            return np.zeros(n)
        per_chunk = self.batch.per_chunk(np_of(pc.count_substring(chunks, pattern), np.float64))
        return per_owner_sum(owner(self.batch.chunk_offsets[self.doc_line_offsets]), per_chunk, n)


def tokenize_docs(texts: pa.Array) -> Tokens:
    lines, doc_line_offsets = split_lines(texts, SPLITLINES, drop_trailing_empty=True)
    batch = words.tokenize(lines)
    return Tokens(batch, batch.offsets[doc_line_offsets], lines, doc_line_offsets)
