"""Sample: keep a seeded, deterministic fraction of documents (by a hash of their id).

The stage lives in :mod:`stages.sample.stage` (the registry imports it). Nothing is imported with
the package: other stages import ``keep_score`` from it, and whatever ran here would enter their
code digests."""
