"""Evaluation inside the training loop: validation bits per byte per domain and one small
multiple-choice task every N steps, with the same scoring code as the ``evaluate`` stage.

Wire it into :class:`stages.train.trainer.Trainer` through its ``on_step_end`` callback::

    from stages.evaluate.hook import InLoopEval

    hook = InLoopEval.build(tokenizer_file, every=100, val_rows=val_sets,       # {domain: [n, seq_len + 1]}
                            task=("mmlu", None), limit=100, prefix_token=bos_id)  # 100 MMLU questions, 0-shot
    trainer.train(on_step_end=hook.attach(trainer))

Every rank must call it (an FSDP-sharded model's forward is collective); only rank 0's trainer has
a metrics sink, so only rank 0 logs (``eval/bits_per_byte/<domain>``, ``eval/bits_per_byte/_macro``,
``eval/<task>/acc``, ``eval/<task>/acc_norm``, at the training step). A sharded or compiled model is
called as a whole (``model(tokens)``); an unwrapped :class:`~stages.train.model.Transformer` gets
the stage's fast path (output head only at scored positions, shared contexts).

The train stage wires it from its ``in_loop_eval`` config (``stages/train``): the driver builds
the task's requests and reads the tokenizer, every worker builds this object with
:meth:`InLoopEval.from_parts` and the full validation set (the same on every rank).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from stages.evaluate.lm import Scorer
from stages.evaluate.perplexity import token_byte_lengths, validation_bpb
from stages.evaluate.scoring import aggregate, domain_metrics, score_example
from stages.evaluate.tasks import MCRequest, build_requests, load_mc_task
from stages.train.model import Transformer


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
    batch_tokens: int = 8192

    @classmethod
    def build(cls, tokenizer_file: str, every: int, val_rows: Optional[dict[str, Any]] = None,
              task: Optional[tuple[str, Optional[str]]] = None, shots: int = 0, limit: Optional[int] = 100,
              prefix_token: int = 0, prompt: Optional[str] = None, batch_tokens: int = 8192) -> "InLoopEval":
        """``task``: (name, JSONL path or None for a built-in); ``limit`` examples spread over it."""
        with open(tokenizer_file, encoding="utf-8") as f:
            tokenizer_json = f.read()
        requests, key = task_requests(task, shots, limit, prompt)
        return cls.from_parts(tokenizer_json, every, val_rows, requests, key, prefix_token, batch_tokens)

    @classmethod
    def from_parts(cls, tokenizer_json: str, every: int, val_rows: Optional[dict[str, Any]], requests: Sequence[MCRequest],
                   task_key: str, prefix_token: int, batch_tokens: int = 8192) -> "InLoopEval":
        """From a tokenizer's JSON and requests built elsewhere (the train stage's driver)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        rows = {d: (v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for d, v in (val_rows or {}).items()}
        return cls(tok, every, rows, list(requests), task_key, prefix_token, token_byte_lengths(tok), batch_tokens)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device | str = "cpu", autocast: Optional[torch.dtype] = None) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = torch.device(device)
        fast = type(model) is Transformer
        scorer = Scorer(model, self.tokenizer, device, self.batch_tokens, 256, self.prefix_token, share_context=fast, fast=fast)
        if not fast:
            scorer.max_len = getattr(getattr(model, "cfg", None), "max_seq_len", scorer.max_len)
        out: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                if self.val_rows:
                    tokens = np.concatenate([self.val_rows[d] for d in sorted(self.val_rows)])
                    sources = [d for d in sorted(self.val_rows) for _ in range(len(self.val_rows[d]))]
                    for domain, m in domain_metrics(validation_bpb(scorer, tokens, sources, self.byte_lengths)).items():
                        if domain != "_all":
                            out[f"eval/bits_per_byte/{domain}"] = m["bits_per_byte"]
                if self.requests:
                    scores = scorer.loglikelihoods([r.context for r in self.requests], [r.continuations for r in self.requests])
                    agg = aggregate(score_example(r.id, r.gold, r.choices, [s[0] for s in sc], [s[1] for s in sc])
                                    for r, sc in zip(self.requests, scores))
                    out[f"eval/{self.task_key}/acc"] = agg["acc"]
                    out[f"eval/{self.task_key}/acc_norm"] = agg["acc_norm"]
        finally:
            if was_training:
                model.train()
        out["eval/seconds"] = time.perf_counter() - t0
        return out

    def attach(self, trainer, chain: Optional[Callable[[int], None]] = None) -> Callable[[int], None]:
        """An ``on_step_end`` callback for ``trainer``: evaluates every ``every`` steps and at the
        last step, logs through the trainer's sink (rank 0), keeps the numbers in ``self.history``."""
        self.history: list[dict[str, float]] = []

        def on_step_end(step: int) -> None:
            if step % self.every == 0 or step == trainer.cfg.steps:
                metrics = self(trainer.model, trainer.device, trainer.autocast)
                metrics["tokens_seen"] = trainer.state.tokens_seen
                self.history.append({"step": step, **metrics})
                if trainer.sink is not None:
                    trainer.sink.log(step, metrics)
            if chain is not None:
                chain(step)

        return on_step_end
