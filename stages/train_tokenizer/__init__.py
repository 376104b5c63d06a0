"""train_tokenizer: a byte-level BPE trained on a seeded sample of the corpus, or an existing one.

The stage class lives in :mod:`stages.train_tokenizer.stage`; importing the package registers it."""

from stages.train_tokenizer.stage import SpecialTokens, TrainTokenizer, TrainTokenizerConfig, describe, load_tokenizer, train_bpe

__all__ = ["SpecialTokens", "TrainTokenizer", "TrainTokenizerConfig", "describe", "load_tokenizer", "train_bpe"]
