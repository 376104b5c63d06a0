"""MinHash signatures equal to ``datasketch.MinHash``'s, computed for a whole batch in numpy.

The pipeline of one batch: normalize (Arrow kernels) -> whitespace tokens -> one 64-bit hash per
token (vectorised over the token bytes) -> one 32-bit hash per shingle (a keyed combination of its
token hashes, vectorised with shifted slices) -> datasketch's ``affine32`` permutation
(``fmix32(h) * a + b mod 2**32``) and a column-wise minimum per document. No per-shingle Python
object is ever created.

"Equal to datasketch" means: ``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash32)``
updated with every shingle of the document has the same ``hashvalues`` (see
:func:`reference_signature`). With ``hash: sha1`` the shingle hash is datasketch's own default
(SHA-1 of the space-joined shingle), so a plain ``datasketch.MinHash(num_perm, seed)`` matches;
that mode builds Python strings per shingle and is several times slower: use it only to interoperate
with existing datasketch indexes.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.config import StrictModel
from stages.dedup.normalize import (
    MASK64,
    NormalizeConfig,
    fmix64,
    hash_strings,
    normalize,
    normalized_join,
    reference_fmix64,
    reference_hash_string,
    reference_tokens,
    tokenize,
)

EMPTY_HASH = np.uint32(0xFFFFFFFF)  # datasketch's value of an empty signature
MAX_SHINGLE = 64


class ShingleConfig(StrictModel):
    kind: Literal["word", "char"] = Field(default="word", description="word n-grams or character n-grams")
    size: int = Field(default=5, ge=1, le=MAX_SHINGLE, description="n of the n-grams")
    hash: Literal["lmpipe64", "sha1"] = Field(
        default="lmpipe64", description="lmpipe64: vectorised; sha1: datasketch's default hash (slow, for interop)"
    )
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)


def _position_constants(n: int) -> list[int]:
    """Odd 64-bit multipliers, one per position in a shingle (fixed: part of the hash definition)."""
    return [reference_fmix64(j + 1) | 1 for j in range(n)]


POSITION_CONSTANTS = _position_constants(MAX_SHINGLE)
_POSITION_CONSTANTS_NP = np.array(POSITION_CONSTANTS, dtype=np.uint64)


def _combine_windows(values: np.ndarray, offsets: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash every window of ``size`` consecutive values inside each document.

    A document with fewer than ``size`` values (but at least one) gives one window of all its
    values; an empty document gives none. Returns (32-bit shingle hashes, per-document offsets)."""
    counts = np.diff(offsets)
    n_docs = len(counts)
    total = len(values)
    per_doc = np.where(counts >= size, counts - size + 1, np.minimum(counts, 1))
    out_offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(per_doc, out=out_offsets[1:])
    result = np.empty(int(out_offsets[-1]), dtype=np.uint64)
    # full windows: every start i with i + size <= end of its document
    long_docs = counts >= size
    if total >= size and long_docs.any():
        acc = values[: total - size + 1] * _POSITION_CONSTANTS_NP[0]
        for j in range(1, size):
            acc += values[j : total - size + 1 + j] * _POSITION_CONSTANTS_NP[j]
        # window k of long document d reads acc[offsets[d] + k] and lands in out_offsets[d] + k
        n_windows = per_doc[long_docs]
        before = np.cumsum(n_windows) - n_windows
        k = np.arange(int(n_windows.sum()), dtype=np.int64) - np.repeat(before, n_windows)
        result[np.repeat(out_offsets[:-1][long_docs], n_windows) + k] = acc[np.repeat(offsets[:-1][long_docs], n_windows) + k]
    short_docs = (counts > 0) & (counts < size)
    for d in np.flatnonzero(short_docs):  # rare: documents shorter than one shingle
        s, e = offsets[d], offsets[d + 1]
        result[out_offsets[d]] = np.sum(values[s:e] * _POSITION_CONSTANTS_NP[: e - s], dtype=np.uint64)
    return (fmix64(result) >> np.uint64(32)).astype(np.uint32), out_offsets


def hash_tokens(tokens: pa.Array) -> np.ndarray:
    """:func:`hash_strings` of every token, computed once per distinct token of the batch."""
    if len(tokens) == 0:
        return np.zeros(0, np.uint64)
    encoded = pc.dictionary_encode(tokens)
    return hash_strings(encoded.dictionary)[encoded.indices.to_numpy(zero_copy_only=False)]


def _codepoints(joined: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    parts = [np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32) for s in joined.to_pylist()]
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    values = np.concatenate(parts).astype(np.uint64) if parts else np.zeros(0, np.uint64)
    return values + np.uint64(1), offsets


def shingle_hashes(texts, cfg: ShingleConfig) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every shingle of every document: (hashes, per-document offsets)."""
    normalized = normalize(texts, cfg.normalize)
    if cfg.hash == "sha1":
        return _sha1_shingle_hashes(normalized, cfg)
    if cfg.kind == "word":
        tokens, offsets = tokenize(normalized)
        return _combine_windows(hash_tokens(tokens), offsets, cfg.size)
    values, offsets = _codepoints(normalized_join(normalized))
    return _combine_windows(values, offsets, cfg.size)


def _sha1_shingle_hashes(normalized: pa.Array, cfg: ShingleConfig) -> tuple[np.ndarray, np.ndarray]:
    hashes: list[int] = []
    offsets = [0]
    joined = normalized_join(normalized).to_pylist()
    for text in joined:
        for shingle in _python_shingles(text, cfg):
            hashes.append(struct.unpack("<I", hashlib.sha1(shingle.encode("utf-8")).digest()[:4])[0])
        offsets.append(len(hashes))
    return np.array(hashes, dtype=np.uint32), np.array(offsets, dtype=np.int64)


def _python_shingles(joined_text: str, cfg: ShingleConfig) -> list[str]:
    if cfg.kind == "word":
        units = joined_text.split(" ") if joined_text else []
        sep = " "
    else:
        units = list(joined_text)
        sep = ""
    if not units:
        return []
    if len(units) < cfg.size:
        return [sep.join(units)]
    return [sep.join(units[i : i + cfg.size]) for i in range(len(units) - cfg.size + 1)]


def fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """datasketch's ``affine32`` MinHash, applied to many documents' shingle hashes at once.

    The permutation matrix is built transposed (num_perm x shingles), so that the minimum per
    document is a ``reduceat`` along contiguous memory; blocks of ``chunk_cols`` shingles keep it
    in cache (measured: ~2x faster than shingles x num_perm, see BENCHMARKS.md)."""

    chunk_cols = 4096

    def __init__(self, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHash

        self.num_perm = num_perm
        self.seed = seed
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self.a = np.ascontiguousarray(a, dtype=np.uint32)[:, None]
        self.b = np.ascontiguousarray(b, dtype=np.uint32)[:, None]
        self._buf = np.empty((num_perm, self.chunk_cols), dtype=np.uint32)

    def signatures(self, hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """(documents x num_perm) uint32; a document without shingles gets the empty signature."""
        n_docs = len(offsets) - 1
        out = np.full((n_docs, self.num_perm), EMPTY_HASH, dtype=np.uint32)
        if n_docs == 0 or len(hashes) == 0:
            return out
        hv = fmix32(np.asarray(hashes, dtype=np.uint32))
        counts = np.diff(offsets)
        docs = np.flatnonzero(counts > 0)
        doc_ends = offsets[docs + 1]
        cols = self.chunk_cols
        i = 0
        while i < len(docs):
            d0 = docs[i]
            start = offsets[d0]
            if counts[d0] > cols:  # a huge document: stream it through the buffer
                acc = out[d0]
                for s in range(start, offsets[d0 + 1], cols):
                    block = self._permute(hv[s : min(s + cols, offsets[d0 + 1])])
                    np.minimum(acc, block.min(axis=1), out=acc)
                i += 1
                continue
            j = max(int(np.searchsorted(doc_ends, start + cols, side="right")), i + 1)  # whole docs that fit
            chunk_docs = docs[i:j]
            block = self._permute(hv[start : offsets[chunk_docs[-1] + 1]])
            out[chunk_docs] = np.minimum.reduceat(block, offsets[chunk_docs] - start, axis=1).T
            i = j
        return out

    def _permute(self, hv: np.ndarray) -> np.ndarray:
        block = self._buf[:, : len(hv)]
        np.multiply(self.a, hv[None, :], out=block)
        np.add(block, self.b, out=block)
        return block

    def signatures_of_texts(self, texts, cfg: ShingleConfig) -> np.ndarray:
        hashes, offsets = shingle_hashes(texts, cfg)
        return self.signatures(hashes, offsets)


# -- reference definitions (plain Python), for tests and for interop -----------------------------

def reference_shingles(text: str, cfg: ShingleConfig) -> list[tuple]:
    """The shingles of one document as tuples of tokens (word) or of characters (char)."""
    if cfg.kind == "word":
        units: list = reference_tokens(text, cfg.normalize)
    else:
        units = list(" ".join(reference_tokens(text, cfg.normalize)))
    if not units:
        return []
    if len(units) < cfg.size:
        return [tuple(units)]
    return [tuple(units[i : i + cfg.size]) for i in range(len(units) - cfg.size + 1)]


def shingle_hash32(shingle: tuple) -> int:
    """The 32-bit hash of one shingle (a tuple of word tokens or of single characters):
    ``fmix64(sum_j unit_hash_j * C_j) >> 32``. Pass it as ``hashfunc`` to datasketch."""
    acc = 0
    for j, unit in enumerate(shingle):
        value = (ord(unit) + 1) if _is_char_unit(shingle) else reference_hash_string(unit)
        acc = (acc + value * POSITION_CONSTANTS[j]) & MASK64
    return reference_fmix64(acc) >> 32


def _is_char_unit(shingle: tuple) -> bool:
    return isinstance(shingle, CharShingle)


class CharShingle(tuple):
    """Marks a shingle of characters (whose units hash by code point, not as strings)."""


def reference_signature(text: str, cfg: ShingleConfig, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """datasketch's own MinHash over the reference shingles: what :class:`MinHasher` must equal."""
    from datasketch import MinHash

    shingles = reference_shingles(text, cfg)
    if cfg.hash == "sha1":
        m = MinHash(num_perm=num_perm, seed=seed)
        sep = " " if cfg.kind == "word" else ""
        for sh in shingles:
            m.update(sep.join(sh).encode("utf-8"))
        return m.hashvalues
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=shingle_hash32)
    for sh in shingles:
        m.update(CharShingle(sh) if cfg.kind == "char" else sh)
    return m.hashvalues


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    return np.mean(sig_a == sig_b, axis=-1)
