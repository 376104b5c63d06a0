"""Compiled (numba) inner loops of hashing and MinHash: one pass over the bytes, no temporaries.

numpy alone needs one full-size temporary per arithmetic step (token hashing, shingle windows,
num_perm x shingles permutation matrix), which capped the vectorised version at ~9,600 docs/s per
core. Here each document is hashed, shingled and min-reduced in one loop, which LLVM vectorises
over the permutations. The definitions are exactly those of the plain-Python twins in
``normalize.py`` / ``minhash.py`` (``reference_*``), which the tests compare against.

numba rules followed here: every constant is an explicit ``np.uint64`` / ``np.uint32`` (mixing
uint64 with int64 would promote to float64); uint64 overflow wraps, as the hash definitions
require, but uint32 arithmetic is widened to 64 bits, so 32-bit results are truncated explicitly. ``cache=True`` compiles once per machine (cached next to this file or in
``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

U64_POLY_BASE = np.uint64(0x9E3779B97F4A7C15)
U64_LENGTH_MIX = np.uint64(0xC2B2AE3D27D4EB4F)
U64_FMIX_1 = np.uint64(0xFF51AFD7ED558CCD)
U64_FMIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
U32_FMIX_1 = np.uint32(0x85EBCA6B)
U32_FMIX_2 = np.uint32(0xC2B2AE35)
U64_ONE = np.uint64(1)
U64_33 = np.uint64(33)
U64_32 = np.uint64(32)
U32_16 = np.uint32(16)
U32_13 = np.uint32(13)
EMPTY32 = np.uint32(0xFFFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def fmix64_scalar(h):
    h ^= h >> U64_33
    h *= U64_FMIX_1
    h ^= h >> U64_33
    h *= U64_FMIX_2
    h ^= h >> U64_33
    return h


@njit(cache=True, nogil=True, inline="always")
def fmix32_scalar(h):
    # numba widens uint32 arithmetic to 64 bits: truncate after every multiplication
    h = np.uint32(h ^ (h >> U32_16))
    h = np.uint32(h * U32_FMIX_1)
    h = np.uint32(h ^ (h >> U32_13))
    h = np.uint32(h * U32_FMIX_2)
    return np.uint32(h ^ (h >> U32_16))


@njit(cache=True, nogil=True, inline="always")
def _hash_bytes(data, start, end):
    """``fmix64(sum_i (byte_i + 1) * POLY_BASE**i + len * LENGTH_MIX)``, all mod 2**64."""
    acc = np.uint64(0)
    power = U64_ONE
    for i in range(start, end):
        acc += (np.uint64(data[i]) + U64_ONE) * power
        power *= U64_POLY_BASE
    acc += np.uint64(end - start) * U64_LENGTH_MIX
    return fmix64_scalar(acc)


@njit(cache=True, nogil=True)
def hash_spans(data, offsets):
    """The string hash of every span ``data[offsets[k]:offsets[k + 1]]``."""
    n = len(offsets) - 1
    out = np.empty(n, dtype=np.uint64)
    for k in range(n):
        out[k] = _hash_bytes(data, offsets[k], offsets[k + 1])
    return out


@njit(cache=True, nogil=True, inline="always")
def _is_ascii_space(byte):
    return byte == 32 or (byte >= 9 and byte <= 13)


@njit(cache=True, nogil=True)
def split_and_hash_ascii(data, doc_offsets):
    """Split each document at runs of ASCII whitespace and hash every token.

    Equals Arrow's ``ascii_split_whitespace`` (after a trim, empty tokens dropped) followed by the
    string hash of each token. Returns (token hashes, per-document token offsets)."""
    n_docs = len(doc_offsets) - 1
    out = np.empty(len(data) // 2 + 1, dtype=np.uint64)  # tokens are separated: <= (bytes + 1) / 2
    token_offsets = np.zeros(n_docs + 1, dtype=np.int64)
    n = 0
    for d in range(n_docs):
        i = doc_offsets[d]
        end = doc_offsets[d + 1]
        while i < end:
            while i < end and _is_ascii_space(data[i]):
                i += 1
            if i >= end:
                break
            start = i
            while i < end and not _is_ascii_space(data[i]):
                i += 1
            out[n] = _hash_bytes(data, start, i)
            n += 1
        token_offsets[d + 1] = n
    return out[:n].copy(), token_offsets


@njit(cache=True, nogil=True, inline="always")
def _window_hash(values, start, width, constants):
    """32-bit shingle hash: ``fmix64(sum_j values[start + j] * C_j) >> 32``."""
    acc = np.uint64(0)
    for j in range(width):
        acc += values[start + j] * constants[j]
    return np.uint32(fmix64_scalar(acc) >> U64_32)


@njit(cache=True, nogil=True)
def window_hashes(values, offsets, size, constants):
    """Every shingle hash of every document (a document shorter than ``size`` but not empty has
    one shingle of all its units). Returns (32-bit hashes, per-document offsets)."""
    n_docs = len(offsets) - 1
    out_offsets = np.zeros(n_docs + 1, dtype=np.int64)
    for d in range(n_docs):
        count = offsets[d + 1] - offsets[d]
        windows = count - size + 1 if count >= size else min(count, 1)
        out_offsets[d + 1] = out_offsets[d] + windows
    out = np.empty(out_offsets[n_docs], dtype=np.uint32)
    for d in range(n_docs):
        count = offsets[d + 1] - offsets[d]
        width = min(count, size)
        for k in range(out_offsets[d + 1] - out_offsets[d]):
            out[out_offsets[d] + k] = _window_hash(values, offsets[d] + k, width, constants)
    return out, out_offsets


@njit(cache=True, nogil=True, inline="always")
def _permute_min(h32, a, b, signature):
    hv = fmix32_scalar(h32)
    for p in range(len(a)):
        v = np.uint32(a[p] * hv + b[p])  # mod 2**32, as datasketch's uint32 arithmetic
        if v < signature[p]:
            signature[p] = v


@njit(cache=True, nogil=True)
def minhash_of_hashes(hashes, offsets, a, b):
    """datasketch ``affine32`` signatures (documents x num_perm) of precomputed shingle hashes."""
    n_docs = len(offsets) - 1
    out = np.full((n_docs, len(a)), EMPTY32, dtype=np.uint32)
    for d in range(n_docs):
        sig = out[d]
        for k in range(offsets[d], offsets[d + 1]):
            _permute_min(hashes[k], a, b, sig)
    return out
