"""LSH banding: choosing b x r like datasketch, band hashes, and the S-curve."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from stages.dedup.normalize import fmix64, reference_fmix64

# Keys of different kinds (band i, text hash, URL hash) share one uint64 column: each kind is
# mixed with its own constant so that equal hashes of different kinds do not meet.
_KIND_CONSTANTS = np.array([reference_fmix64(1000 + k) | 1 for k in range(1024)], dtype=np.uint64)
_ROW_CONSTANTS = np.array([reference_fmix64(5000 + j) | 1 for j in range(1024)], dtype=np.uint64)


def collision_probability(s, b: int, r: int):
    """Probability that two documents of Jaccard ``s`` share at least one band bucket."""
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** r) ** b


@lru_cache(maxsize=64)
def optimal_param(threshold: float, num_perm: int, false_positive_weight: float = 0.5, false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(b, r) minimising the weighted false positive/negative areas: datasketch's ``_optimal_param``."""
    from scipy.integrate import quad

    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp, _ = quad(lambda s: 1 - (1 - s ** float(r)) ** float(b), 0.0, threshold)
            fn, _ = quad(lambda s: 1 - (1 - (1 - s ** float(r)) ** float(b)), threshold, 1.0)
            error = fp * false_positive_weight + fn * false_negative_weight
            if error < best:
                best, opt = error, (b, r)
    return opt


def band_keys(signatures: np.ndarray, b: int, r: int) -> np.ndarray:
    """(documents x b) uint64 bucket keys: a hash of each band's r values, mixed with the band index."""
    n = signatures.shape[0]
    keys = np.empty((n, b), dtype=np.uint64)
    sig = signatures.astype(np.uint64) + np.uint64(1)
    for i in range(b):
        acc = np.zeros(n, dtype=np.uint64)
        for j in range(r):
            acc += sig[:, i * r + j] * _ROW_CONSTANTS[j]
        keys[:, i] = fmix64(fmix64(acc) + _KIND_CONSTANTS[i])
    return keys


def kind_key(values: np.ndarray, kind: int) -> np.ndarray:
    """Namespace a uint64 hash column as key kind ``kind`` (e.g. 0 = text, 1 = URL)."""
    return fmix64(values.astype(np.uint64) + _KIND_CONSTANTS[512 + kind])
