"""train_tokenizer: a byte-level BPE trained on a seeded sample of the corpus, or an existing one.

The stage lives in :mod:`stages.train_tokenizer.stage` (the registry imports it). Nothing is imported with
the package: other stages import its shared modules, and whatever ran here would enter their
code digests."""
