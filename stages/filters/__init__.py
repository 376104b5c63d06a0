"""Curation filters: quality rules, language ID, toxicity and PII masking.

Each stage scores first (typed attribute columns on every row, kept or not) and then decides
(``drop_reason``: null keeps the row, otherwise a snake_case reason naming the rule). The
runner routes and counts; bad input (null text, invalid UTF-8, NUL bytes, empty text) gets a
``quarantine_reason`` instead of a decision (see common.py).

The stages are in stage.py; the quality rules are combined in quality.py from one module per
rule family (gopher_repetition.py, gopher_quality.py, c4.py, fineweb.py).
"""

# Importing the stages registers them: the registry imports every ``stages.<package>``.
from stages.filters.stage import STAGES, LanguageFilter, PiiMasker, QualityFilter, ToxicityFilter

__all__ = ["STAGES", "LanguageFilter", "PiiMasker", "QualityFilter", "ToxicityFilter"]
