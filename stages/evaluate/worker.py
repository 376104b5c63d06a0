"""One evaluation job -- one checkpoint x one task group -- as the evaluate stage runs it on a Ray
worker (or in process): the shared scoring of :mod:`stages.scoring.jobs` (multiple-choice tasks,
bits per byte), plus lm-eval task files, whose code is this stage's. Everything a job needs
travels in :class:`EvalJob`; it returns plain Python values."""

from __future__ import annotations

import time
from typing import Any

from stages.scoring.jobs import EvalJob, TaskJob, TextJob, open_job, score_tasks, score_texts

__all__ = ["EvalJob", "TaskJob", "TextJob", "run_job"]


def run_job(job: EvalJob) -> dict[str, Any]:
    opened = open_job(job)
    score_tasks(job, opened)
    if job.lmeval:
        from stages.evaluate.lmeval_run import run_lmeval_job

        generator = None
        if any(t.output_type == "generate_until" for t in job.lmeval):
            from stages.evaluate.generate import Generator

            generator = Generator(opened.model, opened.tokenizer, job.eos_token, job.device, job.batch_tokens, job.max_batch_size)
        opened.out["lmeval"] = {t.key: run_lmeval_job(t, opened.scorer, job.prefix_token, generator) for t in job.lmeval}
    score_texts(job, opened)
    opened.out["seconds"] = time.perf_counter() - opened.started
    return opened.out
