"""What an ``evaluate`` stage records about its run (the scores themselves are its ``data``)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict

from pipeline.contracts import StageSummary


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvaluatedCheckpoint(_Record):
    path: str
    step: Optional[int]  # None: a model given by path that is not the train stage's own export
    tokens_seen: Optional[int]
    final: bool
    model_id: Optional[str]  # the MLflow LoggedModel of the train stage's export, when tracked


class EvaluatedTask(_Record):
    source: str  # where the examples were read from
    digest: str  # of the examples, as read
    examples: int
    shots: list[int]
    prompt: str  # the prompt format
    limit: Optional[int]  # examples evaluated, spread evenly over the task (None: all)
    skipped_lines: dict[str, int]  # reason -> malformed lines skipped
    # lm-eval task files only
    output_type: Optional[str] = None
    fewshot_seed: Optional[int] = None
    data: Optional[dict[str, str]] = None  # data file -> sha256


class BadTaskLine(_Record):
    task: str
    where: str  # file:line
    reason: str
    message: str


class EvaluationTiming(_Record):
    checkpoint: str
    task: str
    seconds: float
    device: str
    node: str
    examples: Optional[int] = None  # multiple-choice tasks only
    examples_per_second: Optional[float] = None


class EvaluateSummary(StageSummary):
    kind = "evaluate"

    checkpoints: list[EvaluatedCheckpoint]
    device: str
    tokenizer: str  # where the tokenizer was read from
    tasks: dict[str, EvaluatedTask]
    bad_lines: list[BadTaskLine]  # malformed task lines (the first MAX_REPORTED_BAD_LINES)
    text_sets: dict[str, str]  # name -> digest
    timings: list[EvaluationTiming]
    wall_seconds: float
    table: str  # the Markdown table of the results
    reused_jobs: int = 0  # evaluation tasks read from the train stage's checkpoint evaluation (same fingerprint), not recomputed
