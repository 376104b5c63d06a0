"""The train stage's checkpoint evaluation without a model: what its stored results are keyed by,
and where they lie. (Scoring, reuse by the evaluate stage and identical results:
tests/stages/test_evaluate_pipeline.py; under Ray Train: tests/stages/test_train_ray.py.)"""

from __future__ import annotations

import os
from dataclasses import replace

from pipeline import storage as st
from pipeline.types import fingerprinted_config
from stages.scoring.jobs import EvalJob, TaskJob, job_fingerprint, result_uri
from stages.scoring.tasks import MCRequest
from stages.train.config import TrainStageConfig


def _job(checkpoint: str) -> EvalJob:
    request = MCRequest("q1", "The sky is", (" blue", " green"), ("blue", "green"), 0)
    return EvalJob(checkpoint=checkpoint, tokenizer_json='{"model": "tiny"}', prefix_token=1, tasks=(TaskJob("sky_0shot", (request,)),),
                   storage=st.Storage(), meta={"step": 8})


def test_turning_checkpoint_evaluation_on_never_retrains():
    """It scores checkpoints and changes none: outside the train stage's fingerprint."""
    plain = TrainStageConfig()
    scored = TrainStageConfig(checkpoint_eval={"tasks": [{"name": "mmlu", "limit": 10}]})
    assert fingerprinted_config(scored) == fingerprinted_config(plain)


def test_a_result_is_keyed_by_everything_that_decides_it(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint_000"
    checkpoint.mkdir(parents=True)
    (checkpoint / ".metadata").write_bytes(b"dcp")
    (checkpoint / "model_config.json").write_text("{}")
    job = _job(str(checkpoint))
    fingerprint = job_fingerprint(job)
    assert job_fingerprint(replace(job, meta={"step": 9}, storage=None)) == fingerprint  # where it is recorded: not what it scores
    changed = [replace(job, batch_tokens=4096), replace(job, dtype="bfloat16"), replace(job, device="cuda"), replace(job, threads=2),
               replace(job, prefix_token=2), replace(job, tokenizer_json='{"model": "other"}'),
               replace(job, tasks=(TaskJob("sky_0shot", (replace(job.tasks[0].requests[0], context="The sea is"),)),))]
    assert fingerprint not in {job_fingerprint(j) for j in changed}
    os.utime(checkpoint / ".metadata", ns=(1, 1))  # the checkpoint rewritten in place
    assert job_fingerprint(job) != fingerprint
    assert job_fingerprint(replace(job, lmeval=("an lm-eval task file",))) is None  # the evaluate stage's own: never stored


def test_results_lie_beside_the_checkpoint_not_in_it(tmp_path):
    """The checkpoint's files are its identity: a result written into it would change it."""
    assert result_uri(str(tmp_path / "run" / "checkpoint_000"), "abc") == str(tmp_path / "run" / "evaluations" / "checkpoint_000" / "abc.json")
    assert result_uri("s3://bucket/run/checkpoint_000/", "abc") == "s3://bucket/run/evaluations/checkpoint_000/abc.json"
