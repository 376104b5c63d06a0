"""One evaluation job -- one checkpoint x one task group -- as it runs on a Ray worker (or in
process). Everything a job needs travels in :class:`EvalJob`; it returns plain Python values."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from stages.scoring.batching import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_SIZE


@dataclass(frozen=True)
class TaskJob:
    """A multiple-choice task, its requests already rendered (prompts are decided on the driver)."""

    key: str  # e.g. "mmlu_0shot"
    requests: tuple  # tuple[MCRequest, ...]


@dataclass(frozen=True)
class TextJob:
    key: str  # "validation" or a text set's name
    kind: str  # "validation" | "text"
    tokens: Optional[np.ndarray] = None  # validation: [rows, seq_len + 1]
    sources: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    max_rows_per_domain: Optional[int] = None


@dataclass(frozen=True)
class EvalJob:
    checkpoint: str
    tokenizer_json: str
    prefix_token: int
    eos_token: Optional[int] = None  # ends a generation (lm-eval's generate_until)
    tasks: tuple[TaskJob, ...] = ()
    texts: tuple[TextJob, ...] = ()
    lmeval: tuple = ()  # tuple[LmEvalJob, ...]: lm-eval task files (stages.evaluate.lmeval_run)
    storage: Any = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    share_context: bool = True
    hf_runtime: str = "lmpipe"  # or "transformers": what runs a Hugging Face export (stages.scoring.lm.load_checkpoint)
    meta: dict[str, Any] = field(default_factory=dict)


def run_job(job: EvalJob) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer

    from stages.scoring.lm import Scorer, load_checkpoint
    from stages.model.transformer import Transformer
    from stages.scoring.perplexity import text_bpb, token_byte_lengths, validation_bpb
    from stages.scoring.metrics import domain_metrics, score_example

    if job.device == "cpu":
        torch.set_num_threads(job.threads)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_str(job.tokenizer_json)
    loaded = load_checkpoint(job.checkpoint, job.storage, getattr(torch, job.dtype), job.device,
                             vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), hf_runtime=job.hf_runtime)
    load_seconds = time.perf_counter() - t0
    fast = isinstance(loaded.model, Transformer)  # a foreign architecture is called as a whole
    scorer = Scorer(loaded.model, tokenizer, job.device, job.batch_tokens, job.max_batch_size, job.prefix_token,
                    job.share_context and fast, fast=fast)
    out: dict[str, Any] = {"checkpoint": job.checkpoint, "kind": loaded.kind, "runtime": "lmpipe" if fast else "transformers",
                           "step": loaded.step, "tokens_seen": loaded.tokens_seen,
                           "load_seconds": load_seconds, "tasks": {}, "texts": {}, "node": os.uname().nodename, "device": job.device,
                           **job.meta}
    for task in job.tasks:
        t = time.perf_counter()
        reqs = task.requests
        scores = scorer.loglikelihoods([r.context for r in reqs], [r.continuations for r in reqs])
        results = [score_example(r.id, r.gold, r.choices, [s[0] for s in sc], [s[1] for s in sc], r.continuations[r.gold])
                   for r, sc in zip(reqs, scores)]
        seconds = time.perf_counter() - t
        out["tasks"][task.key] = {"results": results, "seconds": seconds, "examples_per_second": len(reqs) / max(seconds, 1e-9)}
    if job.lmeval:
        from stages.evaluate.lmeval_run import run_lmeval_job

        generator = None
        if any(t.output_type == "generate_until" for t in job.lmeval):
            from stages.evaluate.generate import Generator

            generator = Generator(loaded.model, tokenizer, job.eos_token, job.device, job.batch_tokens, job.max_batch_size)
        out["lmeval"] = {t.key: run_lmeval_job(t, scorer, job.prefix_token, generator) for t in job.lmeval}
    byte_lengths = None
    for text in job.texts:
        t = time.perf_counter()
        if text.kind == "validation":
            if byte_lengths is None:
                byte_lengths = token_byte_lengths(tokenizer)
            totals = validation_bpb(scorer, text.tokens, list(text.sources), byte_lengths, text.max_rows_per_domain)
        else:
            totals = text_bpb(scorer, list(text.texts), list(text.sources), job.prefix_token)
        out["texts"][text.key] = {"domains": domain_metrics(totals), "seconds": time.perf_counter() - t}
    out["seconds"] = time.perf_counter() - t0
    return out
