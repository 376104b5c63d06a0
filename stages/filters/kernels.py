"""Compiled (numba) inner loops of the quality rules: token assembly, sentence starts, n-grams.

Each replaced a chain of full-size numpy temporaries (or a batch-wide hash table) with one pass.
N-grams: counting every 2-gram of a batch in one hash table (numpy + pandas) was a quarter of
quality_filter's time: the table holds millions of keys, so nearly every lookup misses the CPU
cache. Here each document gets a small open-addressing table that stays in cache, reused across
documents (a generation stamp marks the slots in use, so nothing is cleared). The n-gram keys and
the definitions (most common n-gram, first among equals; datatrove's greedy walk over duplicated
n-grams) are those gopher_repetition.py documents; the tests compare both against datatrove.

numba rules followed here: every 64-bit constant is an explicit ``np.uint64`` (mixing uint64 with
int64 would promote to float64); uint64 overflow wraps, as the hashes require. ``cache=True``
compiles once per machine.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Odd 64-bit multipliers that mix token ids into n-gram keys (token -> id * K1 + 1; an n-gram
# extends its prefix's key as key * K2 + next token).
K1 = np.uint64(0x9E3779B97F4A7C15)
K2 = np.uint64(0xC2B2AE3D27D4EB4F)
_SLOT_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: a key's high bits pick its slot
_U64_64 = np.uint64(64)
MAX_TOP = 4  # top 2..4-grams
MAX_DUP = 10  # duplicated 5..10-grams


@njit(cache=True, nogil=True)
def _count(keys, positions, count, table_keys, table_counts, table_stamp, stamp, shift, mask, slot_of):
    """Occurrences of each of ``keys[positions[:count]]`` in that list, written to ``slot_of``
    as the slot whose ``table_counts`` holds the number."""
    for j in range(count):
        key = keys[positions[j]]
        slot = (key * _SLOT_MIX) >> shift
        while True:
            if table_stamp[slot] != stamp:
                table_stamp[slot] = stamp
                table_keys[slot] = key
                table_counts[slot] = 1
                break
            if table_keys[slot] == key:
                table_counts[slot] += 1
                break
            slot = (slot + np.uint64(1)) & mask
        slot_of[j] = slot


@njit(cache=True, nogil=True)
def ngram_chars(ids, cum, doc_offsets):
    """``ids``: uint64 token ids of the batch in text order; ``doc_offsets``: per-document
    offsets into them (n + 1). Per document: the characters of its most common 2-, 3- and 4-gram times its count
    (``top``, shape (3, n)) and the characters of its duplicated 5..10-grams by datatrove's
    greedy walk (``dup``, shape (6, n)). ``cum`` holds the cumulative character lengths of the
    tokens (len(ids) + 1); an n-gram's characters for ``top`` include its n - 1 joining spaces."""
    n = len(doc_offsets) - 1
    top = np.zeros((MAX_TOP - 1, n))
    dup = np.zeros((MAX_DUP - MAX_TOP, n))
    longest = 0
    for d in range(n):
        longest = max(longest, doc_offsets[d + 1] - doc_offsets[d])
    if longest < 2:
        return top, dup
    bits = 1
    while (1 << bits) < 2 * longest:
        bits += 1
    size_t = 1 << bits
    shift = _U64_64 - np.uint64(bits)
    mask = np.uint64(size_t - 1)
    table_keys = np.zeros(size_t, np.uint64)
    table_counts = np.zeros(size_t, np.int64)
    table_stamp = np.zeros(size_t, np.int64)
    seen_stamp = np.zeros(size_t, np.int64)
    keys = np.empty(longest, np.uint64)
    positions = np.empty(longest, np.int64)
    slot_of = np.empty(longest, np.uint64)
    stamp = 0
    for d in range(n):
        start = doc_offsets[d]
        m = doc_offsets[d + 1] - start
        if m < 2:
            continue
        count = m - 1
        for p in range(count):
            positions[p] = p
            keys[p] = (ids[start + p] * K1 + np.uint64(1)) * K2 + (ids[start + p + 1] * K1 + np.uint64(1))
        for size in range(2, MAX_DUP + 1):
            if size > 2:
                # an n-gram can only repeat where its leading (n-1)-gram does: keep those positions
                kept = 0
                for j in range(count):
                    p = positions[j]
                    if table_counts[slot_of[j]] > 1 and p <= m - size:
                        positions[kept] = p
                        keys[p] = keys[p] * K2 + (ids[start + p + size - 1] * K1 + np.uint64(1))
                        kept += 1
                count = kept
            if m < size:
                break
            stamp += 1
            _count(keys, positions, count, table_keys, table_counts, table_stamp, stamp, shift, mask, slot_of)
            if size <= MAX_TOP:
                # Counter.most_common(1): the highest count, the earliest first occurrence among
                # equals; with nothing repeated, the document's first n-gram
                best_count = 1
                at = 0
                for j in range(count):
                    c = table_counts[slot_of[j]]
                    if c > best_count:
                        best_count = c
                        at = positions[j]
                top[size - 2, d] = best_count * (cum[start + at + size] - cum[start + at] + size - 1)
            else:
                skip_until = -1
                repeated = 0
                for j in range(count):
                    p = positions[j]
                    if p < skip_until or table_counts[slot_of[j]] < 2:
                        continue
                    slot = slot_of[j]
                    if seen_stamp[slot] == stamp:
                        repeated += cum[start + p + size] - cum[start + p]
                        skip_until = p + size
                    else:
                        seen_stamp[slot] = stamp
                dup[size - MAX_TOP - 1, d] = repeated
    return top, dup


@njit(cache=True, nogil=True)
def expand_tokens(chunk_ids, chunk_token_counts, chunk_token_starts, token_ids):
    """Token ids in text order from whitespace chunks: chunk ``c`` (a distinct-chunk id) stands
    for ``chunk_token_counts[c]`` tokens whose ids are ``token_ids[chunk_token_starts[c]:]``.
    Returns (ids, per-chunk-occurrence offsets into them)."""
    n = len(chunk_ids)
    offsets = np.empty(n + 1, np.int64)
    offsets[0] = 0
    for k in range(n):
        offsets[k + 1] = offsets[k] + chunk_token_counts[chunk_ids[k]]
    ids = np.empty(offsets[n], np.int64)
    for k in range(n):
        c = chunk_ids[k]
        start = chunk_token_starts[c]
        base = offsets[k]
        for j in range(chunk_token_counts[c]):
            ids[base + j] = token_ids[start + j]
    return ids, offsets


@njit(cache=True, nogil=True)
def sentence_counts(token_kind, ids, offsets):
    """Sentences per item as spaCy's sentencizer splits them. ``token_kind`` per vocabulary
    entry: 0 punctuation, 1 other, 2 sentence end. A sentence starts at a kind-1 token whose last
    preceding non-punctuation token of the same item is a sentence end; an item with tokens has
    at least one sentence."""
    n = len(offsets) - 1
    out = np.zeros(n, np.int64)
    for i in range(n):
        if offsets[i + 1] == offsets[i]:
            continue
        count = 1
        last = -1
        for t in range(offsets[i], offsets[i + 1]):
            kind = token_kind[ids[t]]
            if kind == 1 and last == 2:
                count += 1
            if kind > 0:
                last = kind
        out[i] = count
    return out
