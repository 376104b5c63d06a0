"""Deduplication stages: ``exact_dedup`` (normalized-text and URL hashes) and ``minhash_dedup``
(MinHash LSH near-duplicates). Both keep every input row exactly once: kept rows go to ``data``,
duplicates to ``rejected`` with ``drop_reason``, ``duplicate_of`` (the kept document's id),
``dup_component`` and ``dup_component_size``. See :mod:`stages.dedup.engine` for how the work is
distributed and what bounds its memory.

The stage class lives in :mod:`stages.dedup.stage`; importing the package registers it."""

from stages.dedup.stage import ExactDedup, MinhashDedup, default_partitions

__all__ = ["ExactDedup", "MinhashDedup", "default_partitions"]
