"""The one integer mixer of the tokenize stage and its loader (bucket assignment, Feistel rounds,
shuffle windows): one definition, so the two cannot drift apart."""

from __future__ import annotations

import numpy as np


def mix64(x):
    """splitmix64's finaliser on uint64 (arrays or scalars; wrapping arithmetic): a bijection that
    scrambles every bit."""
    x = np.uint64(x) if np.isscalar(x) else np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))
