"""tokenize: documents -> packed, mixed, shuffled token sequences in Arrow IPC shards.

The stage lives in :mod:`stages.tokenize.stage` (the registry imports it). Nothing is imported with
the package: other stages import its shared modules, and whatever ran here would enter their
code digests."""
