"""How a document becomes one line of fastText input, for training and scoring alike (DCLM's
recipe: lower case, one line, at most ``max_chars`` characters), and the AUC of scores."""

from __future__ import annotations

import re

NORMALIZATION = "lower_one_line_v1"
LABEL_PREFIX = "__label__"
_SPACE = re.compile(r"\s+")


def fasttext_line(text: str, max_chars: int) -> str:
    return _SPACE.sub(" ", text[:max_chars]).strip().lower()


def roc_auc(scores: list[float], positive: list[bool]) -> float:
    """Area under the ROC curve by the rank statistic (ties count half); 0.5 without both classes."""
    n_pos = sum(positive)
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return 0.5
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
