"""The arithmetic of evaluation, on plain numbers: nothing here knows about models or files.

Multiple choice follows lm-evaluation-harness exactly:

* ``acc``: the choice whose continuation has the highest summed log-likelihood
  (``numpy.argmax``: the first one on a tie).
* ``acc_norm``: the same after dividing each log-likelihood by the length *in characters* of
  the choice string (``len(choice)``, without the target delimiter -- lm-eval's
  ``completion_len``), so long choices are not penalised for having more tokens.
* ``gold_bits_per_byte`` (DataDecide's and OLMES's continuous metric, far more predictive at
  small scale than accuracy): per example, minus the log-likelihood of the gold continuation as
  scored (the target delimiter included) over ln 2 times its UTF-8 bytes; averaged over examples.
* standard error: the sample standard deviation (n - 1) over examples / sqrt(n) (lm-eval's
  ``mean_stderr``).

Bits per byte (Paloma, The Pile): the summed negative log-likelihood in nats of the scored
tokens, divided by ln 2 and by the number of UTF-8 bytes of the text those tokens encode. It
does not depend on the tokenizer, so models with different vocabularies compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class ChoiceResult:
    """One multiple-choice example, scored: per-choice log-likelihoods and what was picked."""

    id: str
    gold: int
    lls: tuple[float, ...]
    greedy: tuple[bool, ...]
    pred: int
    pred_norm: int
    gold_bytes: int  # UTF-8 bytes of the gold continuation as scored (target delimiter included)

    @property
    def gold_bits_per_byte(self) -> float:
        return bits_per_byte(-self.lls[self.gold], self.gold_bytes)

    @property
    def acc(self) -> float:
        return float(self.pred == self.gold)

    @property
    def acc_norm(self) -> float:
        return float(self.pred_norm == self.gold)


def predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of lls, argmax of lls / len(choice)) -- lm-eval's ``pred`` and ``pred_norm``."""
    lls_arr = np.asarray(lls, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    return int(np.argmax(lls_arr)), int(np.argmax(lls_arr / lengths))


def score_example(example_id: str, gold: int, choices: Sequence[str], lls: Sequence[float], greedy: Sequence[bool],
                  gold_continuation: str) -> ChoiceResult:
    """``gold_continuation``: the gold choice's continuation as it was scored (its bytes divide ``gold_bits_per_byte``)."""
    pred, pred_norm = predictions(lls, choices)
    return ChoiceResult(example_id, gold, tuple(float(x) for x in lls), tuple(bool(g) for g in greedy), pred, pred_norm,
                        len(gold_continuation.encode("utf-8")))


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation / sqrt(n); NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def aggregate(results: Iterable[ChoiceResult]) -> dict[str, float]:
    results = list(results)
    acc = [r.acc for r in results]
    acc_norm = [r.acc_norm for r in results]
    gold_bpb = [r.gold_bits_per_byte for r in results]
    n = len(results)
    return {
        "acc": sum(acc) / n if n else float("nan"),
        "acc_stderr": mean_stderr(acc),
        "acc_norm": sum(acc_norm) / n if n else float("nan"),
        "acc_norm_stderr": mean_stderr(acc_norm),
        "gold_bits_per_byte": sum(gold_bpb) / n if n else float("nan"),
        "gold_bits_per_byte_stderr": mean_stderr(gold_bpb),
        "n": float(n),
    }


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    return nll_nats / (LN2 * n_bytes) if n_bytes > 0 else float("nan")


@dataclass
class TextTotals:
    """Running sums for one domain: negative log-likelihood (nats), scored tokens, their bytes."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    docs: int = 0

    def add(self, nll: float, tokens: int, n_bytes: int, docs: int = 0) -> None:
        self.nll += float(nll)
        self.tokens += int(tokens)
        self.bytes += int(n_bytes)
        self.docs += int(docs)

    def metrics(self) -> dict[str, float]:
        return {
            "bits_per_byte": bits_per_byte(self.nll, self.bytes),
            "perplexity": math.exp(self.nll / self.tokens) if self.tokens else float("nan"),
            "nll_per_token": self.nll / self.tokens if self.tokens else float("nan"),
            "tokens": float(self.tokens),
            "bytes": float(self.bytes),
        }


def domain_metrics(per_domain: dict[str, TextTotals]) -> dict[str, dict[str, float]]:
    """Per domain, plus ``_macro`` (the unweighted mean over domains, Paloma's headline number)
    and ``_all`` (every token pooled)."""
    out = {d: t.metrics() for d, t in sorted(per_domain.items())}
    if out:
        out["_macro"] = {k: float(np.mean([m[k] for m in out.values()])) for k in ("bits_per_byte", "perplexity", "nll_per_token")}
        pooled = TextTotals()
        for t in per_domain.values():
            pooled.add(t.nll, t.tokens, t.bytes, t.docs)
        out["_all"] = pooled.metrics()
    return out
