"""Scoring each checkpoint as training commits it (the train stage's ``checkpoint_eval``).

The train stage builds a :class:`CheckpointEvaluator` on its driver -- the evaluate stage's jobs
(:func:`stages.scoring.jobs.checkpoint_jobs`) less the checkpoint -- and the train launcher hands
it to Ray Train, which calls it in a Ray task of its own (its own CPUs or GPU, not a training
worker's) for every checkpoint that all workers have reported, while training goes on. For each
job it stores the result beside the checkpoint under the job's fingerprint (the evaluate stage
reads it back instead of scoring the same job again) and logs the metrics to the train stage's
MLflow run at the checkpoint's step, as ``checkpoint_eval/<task>/<metric>``.

It never raises: a failing evaluation (a checkpoint removed by ``checkpoint.keep`` before its turn,
an out-of-memory device) is one warning line and an error record in the checkpoint's metrics,
and training carries on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from stages.scoring.jobs import (JobSettings, TaskJob, TextJob, checkpoint_jobs, job_fingerprint, result_rows, result_uri, run_job,
                                 special_tokens, store_result, stored_result, task_jobs, text_set_jobs, validation_job)

log = logging.getLogger("lmpipe.train")

METRIC_PREFIX = "checkpoint_eval/"
ERROR_KEY = "checkpoint_eval_error"  # in the checkpoint's Ray Train metrics: the failure, one line
RESULTS_KEY = "checkpoint_eval_results"  # the stored results' URIs, one per job


@dataclass(frozen=True)
class CheckpointEvaluator:
    tokenizer_json: str
    prefix_token: int
    eos_token: Optional[int]
    task_groups: tuple[tuple[TaskJob, ...], ...]
    texts: tuple[TextJob, ...]
    settings: JobSettings
    metrics: Any = None  # the train stage's MLflow run (pipeline.tracking.RunLogger): log(step, metrics)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    timeout_s: Optional[float] = None

    def jobs(self, checkpoint: str, step: int, tokens_seen: int):
        return checkpoint_jobs(checkpoint, self.tokenizer_json, self.prefix_token, self.eos_token, self.task_groups, self.texts,
                               self.settings, meta={"step": step, "tokens_seen": tokens_seen})

    def __call__(self, checkpoint: str, step: int, tokens_seen: int) -> dict[str, Any]:
        """Score ``checkpoint``; its metrics (``checkpoint_eval/...``) and the stored results' URIs,
        or ``{ERROR_KEY: line}``."""
        try:
            metrics: dict[str, Any] = {}
            uris = []
            for job in self.jobs(checkpoint, step, tokens_seen):
                fingerprint = job_fingerprint(job)
                res = stored_result(job, fingerprint)  # a restarted run's controller may ask for a checkpoint scored before
                if res is None:
                    res = run_job(job)
                    store_result(job, fingerprint, res)
                uris.append(result_uri(job.checkpoint, fingerprint))
                metrics.update({f"{METRIC_PREFIX}{r['task']}/{r['metric']}": r["value"] for r in result_rows(res)})
            if self.metrics is not None:
                self.metrics.log(step, metrics)
            log.info("checkpoint evaluation: step %d scored (%d job(s))", step, len(uris))
            return {**metrics, RESULTS_KEY: uris}
        except Exception as e:  # never the training's problem: one line, and the record says why
            reason = (str(e).strip().splitlines() or [""])[0]
            line = f"checkpoint evaluation of step {step} ({checkpoint}) failed: {type(e).__name__}: {reason}"
            log.warning(line)
            return {ERROR_KEY: line}


def build_evaluator(config: Any, tokenizer_json: str, bos: Optional[int], eos: Optional[int], tokenizer_source: str,
                    validation: Any, storage: Any, metrics: Any = None) -> CheckpointEvaluator:
    """From the train stage's ``checkpoint_eval`` config (``stages.train.config.CheckpointEvalConfig``)
    and what its driver read: the tokenizer, and the validation split's first rows per source
    (a ``ValidationSample``, None without validation). Tasks are rendered and text sets read here,
    once, as the evaluate stage does for the same entries."""
    from stages.scoring.tasks import load_mc_task

    prefix, eos = special_tokens(tokenizer_json, bos, eos, tokenizer_source)
    groups = []
    for entry in config.tasks:
        loaded = load_mc_task(entry.name, entry.path, storage)
        if loaded.bad_lines:
            log.warning("checkpoint_eval task %s: skipped %d malformed line(s) of %s (first: %s)", entry.name, len(loaded.bad_lines),
                        loaded.source, loaded.bad_lines[0].message)
        groups.append(task_jobs(loaded.task, entry.prompt_format(), entry.shots, entry.limit, entry.name))
    texts = [validation_job(validation)] if validation is not None else []
    texts += text_set_jobs(config.text_sets, storage)[0]
    settings = JobSettings(storage=storage, device="cuda" if config.use_gpu else "cpu", dtype=config.dtype,
                           threads=max(1, int(config.cpus_per_task)), batch_tokens=config.batch_tokens,
                           max_batch_size=config.max_batch_size, share_context=config.share_context)
    return CheckpointEvaluator(tokenizer_json, prefix, eos, tuple(groups), tuple(texts), settings, metrics=metrics,
                               num_cpus=config.cpus_per_task, num_gpus=1.0 if config.use_gpu else 0.0, timeout_s=config.timeout_s)
