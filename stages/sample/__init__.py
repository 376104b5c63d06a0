"""Sample: keep a seeded, deterministic fraction of documents (by a hash of their id).

The stage class lives in :mod:`stages.sample.stage`; importing the package registers it."""

from stages.sample.stage import Sample, keep_score

__all__ = ["Sample", "keep_score"]
