"""Evaluation inside the training loop: validation bits per byte (and loss) per domain and one
small multiple-choice task every N steps, with the same scoring code as the ``evaluate`` stage.

:class:`InLoopEval` is one of the trainer's validators (``stages.train.trainer.Validator``)::

    from stages.scoring.hook import InLoopEval

    in_loop = InLoopEval.build(tokenizer_file, every=100, val_rows=val_sets,       # {domain: [n, seq_len + 1]}
                               task=("mmlu", None), limit=100, prefix_token=bos_id)  # 100 MMLU questions, 0-shot
    Trainer(..., validators=[in_loop]).train()

Every rank runs it (an FSDP-sharded model's forward is collective); only rank 0's trainer has a
metrics sink, so only rank 0 logs (``eval/bits_per_byte/<domain>``, ``eval/bits_per_byte/_macro``,
``eval/<task>/acc``, ``eval/<task>/acc_norm``, ``eval/<task>/gold_bits_per_byte``, at the
training step). Scoring the validation split
gives each token's loss, so the same pass reports ``val_loss/<domain>`` and ``val_loss`` (their
mean over domains) as well, and the trainer's own validation loss need not score the split again.

The numbers are the evaluate stage's for the same weights, to the last bit where the arithmetic is
the same (fp32; the same requests): lmpipe's model, sharded (FSDP2) or not, is scored by the
stage's own path -- shared contexts, the output head only at scored positions -- with the stage's
default batching (:mod:`stages.scoring.batching`). Scoring a sharded model by whole-model calls
instead (one row per choice, a plain causal pass) gave log-likelihoods a few ulps away from the
stage's, because the attention kernel and the padded widths differ. The trainer's compute dtype
applies (bf16 under a bf16 mixed-precision policy): it matches the stage only at the same dtype.

The train stage wires it from its ``in_loop_eval`` config (``stages/train``): the driver builds an
:class:`InLoopEvalSpec` (the task's requests, the tokenizer), and every worker turns it into an
:class:`InLoopEval` over the full validation set (the same on every rank).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from stages.scoring.batching import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_SIZE
from stages.scoring.lm import Scorer
from stages.scoring.perplexity import token_byte_lengths, validation_bpb
from stages.scoring.metrics import aggregate, domain_metrics, score_example
from stages.scoring.tasks import MCRequest, build_requests, load_mc_task
from stages.model.transformer import Transformer


def task_requests(task: Optional[tuple[str, Optional[str]]], shots: int = 0, limit: Optional[int] = 100,
                  prompt: Optional[str] = None, storage: Any = None) -> tuple[list[MCRequest], str]:
    """The scoring requests of a multiple-choice task and its metric key (``<name>_<shots>shot``)."""
    if task is None:
        return [], ""
    name, path = task
    lt = load_mc_task(name, path, storage)
    fmt = prompt or ("mmlu" if name == "mmlu" and path is None else "plain")
    return build_requests(lt.task, fmt, shots, limit), f"{name}_{shots}shot"


@dataclass
class InLoopEval:
    tokenizer: Any
    every: int
    val_rows: dict[str, np.ndarray]
    requests: Sequence[MCRequest]
    task_key: str
    prefix_token: int
    byte_lengths: np.ndarray
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE

    @classmethod
    def build(cls, tokenizer_file: str, every: int, val_rows: Optional[dict[str, Any]] = None,
              task: Optional[tuple[str, Optional[str]]] = None, shots: int = 0, limit: Optional[int] = 100,
              prefix_token: int = 0, prompt: Optional[str] = None, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> "InLoopEval":
        """``task``: (name, JSONL path or None for a built-in); ``limit`` examples spread over it."""
        with open(tokenizer_file, encoding="utf-8") as f:
            tokenizer_json = f.read()
        requests, key = task_requests(task, shots, limit, prompt)
        return cls.from_parts(tokenizer_json, every, val_rows, requests, key, prefix_token, batch_tokens)

    @classmethod
    def from_parts(cls, tokenizer_json: str, every: int, val_rows: Optional[dict[str, Any]], requests: Sequence[MCRequest],
                   task_key: str, prefix_token: int, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> "InLoopEval":
        """From a tokenizer's JSON and requests built elsewhere (the train stage's driver)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        rows = {d: (v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for d, v in (val_rows or {}).items()}
        return cls(tok, every, rows, list(requests), task_key, prefix_token, token_byte_lengths(tok), batch_tokens)

    def should_run(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    def run(self, trainer) -> dict[str, float]:
        """Scores ``trainer.model`` as the trainer runs it (device, autocast)."""
        model, device = trainer.model, trainer.device
        own = isinstance(model, Transformer)  # FSDP2's sharded module is a subclass of the model's class
        if own and trainer.sharded:
            model = ShardedScoring(model)
        scorer = Scorer(model, self.tokenizer, device, self.batch_tokens, self.max_batch_size, self.prefix_token,
                        share_context=own, fast=own)
        out: dict[str, float] = {}
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=trainer.autocast, enabled=trainer.autocast is not None):
            if self.val_rows:
                tokens = np.concatenate([self.val_rows[d] for d in sorted(self.val_rows)])
                sources = [d for d in sorted(self.val_rows) for _ in range(len(self.val_rows[d]))]
                for domain, m in domain_metrics(validation_bpb(scorer, tokens, sources, self.byte_lengths)).items():
                    if domain == "_all":
                        continue
                    out[f"eval/bits_per_byte/{domain}"] = m["bits_per_byte"]
                    out["val_loss" if domain == "_macro" else f"val_loss/{domain}"] = m["nll_per_token"]
            if self.requests:
                scores = scorer.loglikelihoods([r.context for r in self.requests], [r.continuations for r in self.requests])
                agg = aggregate(score_example(r.id, r.gold, r.choices, [s[0] for s in sc], [s[1] for s in sc], r.continuations[r.gold])
                                for r, sc in zip(self.requests, scores))
                for metric in ("acc", "acc_norm", "gold_bits_per_byte"):
                    out[f"eval/{self.task_key}/{metric}"] = agg[metric]
        out["eval/seconds"] = time.perf_counter() - t0
        return out


class ShardedScoring:
    """An FSDP2-sharded :class:`Transformer` as the scorer's fast path calls it: ``forward`` (the
    blocks gather and free their shards as in training) and the output head on the hidden states
    it scores. The head belongs to the root module, whose parameters a forward leaves gathered
    (FSDP keeps the root's for the backward); ``unshard`` makes sure of it before the head runs,
    and the trainer reshards after its validators."""

    def __init__(self, model: Transformer):
        self.model = model
        self.cfg = model.cfg

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.model(*args, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.model.unshard()
        return self.model.logits(hidden)


@dataclass(frozen=True)
class InLoopEvalSpec:
    """What every rank needs to build its :class:`InLoopEval` (built on the driver and pickled to
    the workers: they never fetch tasks or tokenizers themselves)."""

    every: int
    tokenizer_json: str
    prefix_token: int
    requests: tuple = ()
    task_key: str = ""
    validation: bool = True

    def validator(self, validation: dict[str, torch.Tensor]) -> InLoopEval:
        """Over the full validation split ``validation`` (when this evaluation scores it)."""
        rows = validation if self.validation else {}
        return InLoopEval.from_parts(self.tokenizer_json, self.every, rows, self.requests, self.task_key, self.prefix_token)
