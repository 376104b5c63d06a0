"""Decontaminate: remove evaluation-set text from the training corpus (GPT-3's 13-gram rule, or
Dolma's paragraph-level exact match with ``match: paragraph``).

The stage class lives in :mod:`stages.decontaminate.stage`; importing the package registers it."""

from stages.decontaminate.stage import Decontaminate, DecontaminateConfig

__all__ = ["Decontaminate", "DecontaminateConfig"]
