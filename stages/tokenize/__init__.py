"""tokenize: documents -> packed, mixed, shuffled token sequences in Arrow IPC shards.

The stage class lives in :mod:`stages.tokenize.stage`; importing the package registers it."""

from stages.tokenize.stage import Tokenize, TokenizeConfig, mixture_rates

__all__ = ["Tokenize", "TokenizeConfig", "mixture_rates"]
