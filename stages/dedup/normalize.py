"""Text normalization, tokenization and 64-bit string hashing, vectorised over Arrow arrays.

Everything here works on a whole batch at once (Arrow compute kernels and numpy), never on one
token at a time in Python: this is what lets MinHash run at thousands of documents per second
per core. Each vectorised function has a plain-Python twin (``reference_*``) used by the tests to
pin the exact definition.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import StrictModel

MASK64 = (1 << 64) - 1
# Constants of the string hash (fixed forever: changing them changes every signature).
POLY_BASE = 0x9E3779B97F4A7C15  # odd multiplier of the polynomial rolling hash
LENGTH_MIX = 0xC2B2AE3D27D4EB4F
# Punctuation and symbols: anything that is not a letter, a number, a mark or whitespace.
PUNCTUATION = r"[^\p{L}\p{N}\p{M}\s]+"
DIGITS = r"\p{N}+"


class NormalizeConfig(StrictModel):
    """How text is normalized before hashing (exact dedup) or shingling (MinHash)."""

    lowercase: bool = True
    strip_punctuation: bool = True
    strip_digits: bool = False
    unicode_nfkc: bool = False


def _as_string_array(texts) -> pa.Array:
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if not isinstance(texts, pa.Array):
        texts = pa.array(texts, pa.string())
    if pa.types.is_large_string(texts.type):
        texts = texts.cast(pa.string())
    return pc.fill_null(texts, "")


def normalize(texts, cfg: NormalizeConfig) -> pa.Array:
    """Apply the configured normalization; whitespace is left for :func:`tokenize` to split."""
    arr = _as_string_array(texts)
    if cfg.unicode_nfkc:
        arr = pc.utf8_normalize(arr, form="NFKC")
    if cfg.lowercase:
        arr = pc.utf8_lower(arr)
    if cfg.strip_punctuation:
        arr = pc.replace_substring_regex(arr, PUNCTUATION, " ")
    if cfg.strip_digits:
        arr = pc.replace_substring_regex(arr, DIGITS, " ")
    return arr


def tokenize(normalized: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Whitespace tokens of every document: (flat token array, per-document offsets into it)."""
    # Trim first: a trailing separator would make an empty last token (and pyarrow 25's
    # split kernel has been seen to return that token with stray bytes).
    lists = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(normalized))
    tokens = lists.flatten()
    counts = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = pc.binary_length(tokens).to_numpy(zero_copy_only=False)
    nonempty = lengths > 0
    if not nonempty.all():  # an empty document splits into one empty token: drop those
        doc_of_token = np.repeat(np.arange(len(counts)), counts)
        counts = np.bincount(doc_of_token[nonempty], minlength=len(counts)).astype(np.int64)
        tokens = tokens.filter(pa.array(nonempty))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return tokens, offsets


def normalized_join(normalized: pa.Array) -> pa.Array:
    """Tokens joined by single spaces: the canonical text that exact dedup hashes."""
    return pc.binary_join(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(normalized)), " ")


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection), element-wise with wrap-around."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _string_buffers(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = _as_string_array(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


def hash_strings(arr: pa.Array) -> np.ndarray:
    """A 64-bit hash of every string's UTF-8 bytes (compiled loop, see ``kernels.py``).

    ``fmix64(sum_i (byte_i + 1) * POLY_BASE**i  +  len * LENGTH_MIX)  mod 2**64``
    """
    from stages.dedup.kernels import hash_spans  # numba: loaded on first use, not at stage discovery

    offsets, data = _string_buffers(arr)
    if len(offsets) <= 1:
        return np.zeros(0, np.uint64)
    return hash_spans(data, offsets)


# -- reference (plain Python) definitions, for tests ---------------------------------------------

def reference_fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & MASK64
    return h ^ (h >> 33)


def reference_hash_string(s: str) -> int:
    data = s.encode("utf-8")
    acc = 0
    for i, byte in enumerate(data):
        acc = (acc + (byte + 1) * pow(POLY_BASE, i, 1 << 64)) & MASK64
    acc = (acc + len(data) * LENGTH_MIX) & MASK64
    return reference_fmix64(acc)


def reference_tokens(text: str, cfg: NormalizeConfig) -> list[str]:
    """The tokens of one document (through the same Arrow kernels, so they cannot drift)."""
    normalized = normalize(pa.array([text], pa.string()), cfg)
    tokens, _ = tokenize(normalized)
    return tokens.to_pylist()
