"""The training loader's sample order: a keyed bijection over ``[0, n)`` (a Feistel network with
cycle-walking) and the canonical streams' segments of the chunk-ordered corpus. Written here
rather than with numpy's shuffle because numpy does not promise its streams across versions, and a
resumed run must see the same order after an upgrade. See :mod:`stages.tokenize.loader` for how
the loader composes them."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from stages.tokenize.hashing import mix64

_U = np.uint64


_ROUND_CONSTANTS = mix64(np.arange(1, 9, dtype=np.uint64) * _U(0x9E3779B97F4A7C15))


def order_key(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little")


def feistel(x: np.ndarray, n: Any, key: Any, rounds: int = 4) -> np.ndarray:  # rounds <= 8
    """A keyed permutation of ``[0, n)`` applied to ``x``: a balanced Feistel network over the
    smallest even number of bits covering ``n`` (at most 4n values), cycle-walking values that
    land outside ``[0, n)`` back in. ``n`` and ``key`` may be arrays (one permutation per element)."""
    x = np.asarray(x, dtype=np.uint64).reshape(-1)
    n = np.broadcast_to(np.asarray(n, dtype=np.uint64), x.shape).copy()
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), x.shape).copy()
    bits = np.ceil(np.log2(np.maximum(n, 1).astype(np.float64))).astype(np.uint64)
    bits += (np.left_shift(_U(1), bits) < n).astype(np.uint64)  # float log2 rounding
    bits = np.maximum(bits + (bits & _U(1)), _U(2))
    half = bits >> _U(1)
    mask = np.left_shift(_U(1), half) - _U(1)
    round_keys = [mix64(key ^ _ROUND_CONSTANTS[r]) for r in range(rounds)]

    def once(v: np.ndarray, sel: np.ndarray) -> np.ndarray:
        h, m = half[sel], mask[sel]
        left, right = v >> h, v & m
        for rk in round_keys:
            left, right = right, left ^ (mix64(right ^ rk[sel]) & m)
        return (left << h) | right

    everything = np.arange(len(x))
    y = once(x, everything)
    out = y >= n
    while out.any():  # expected < 4 rounds of walking: the domain is < 4n
        idx = np.nonzero(out)[0]
        y[idx] = once(y[idx], idx)
        out[idx] = y[idx] >= n[idx]
    return y.astype(np.int64)


def segment_of_stream(streams: int) -> np.ndarray:
    """Which segment of the chunk-ordered corpus each stream reads: the stream number's digits
    reversed in the mixed radix of ``streams``'s prime factors, smallest first. The streams of one
    rank (``s = r mod W``) then hold contiguous segments whenever W is a product of the smallest
    factors (every power of two for ``streams = 64``), so only W - 1 segment boundaries lie
    between two ranks."""
    factors, n, f = [], streams, 2
    while n > 1:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    out = np.zeros(streams, dtype=np.int64)
    for stream in range(streams):
        rest, weight, g = stream, streams, 0
        for f in factors:
            weight //= f
            g += (rest % f) * weight
            rest //= f
        out[stream] = g
    return out


def stream_segments(num_sequences: int, streams: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per stream: its length (streams ``s < N mod C`` hold one more, so that global position
    ``p`` is valid exactly when ``p < N``), where its segment starts, and whether it reads it
    backwards. Odd segments are read backwards, so the two streams that share a boundary chunk read
    it at the same time (both at the start of the epoch, or both at the end): one read serves both
    where they are on the same rank."""
    q, r = divmod(num_sequences, streams)
    length = q + (np.arange(streams) < r)
    segment = segment_of_stream(streams)
    by_segment = np.argsort(segment)
    first = np.zeros(streams, dtype=np.int64)
    first[by_segment] = np.concatenate([[0], np.cumsum(length[by_segment])[:-1]])
    return length.astype(np.int64), first, segment % 2 == 1
