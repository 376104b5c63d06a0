"""What an ``evaluate`` stage records about its run (the scores themselves are its ``data``)."""

from __future__ import annotations

from typing import Any, Optional

from pipeline.contracts import StageSummary


class EvaluateSummary(StageSummary):
    kind = "evaluate"

    checkpoints: list[dict[str, Any]]  # path, step, tokens_seen, final, model_id
    device: str
    tokenizer: str  # where the tokenizer was read from
    tasks: dict[str, dict[str, Any]]  # name -> source, digest, examples, shots, prompt, limit, skipped_lines
    bad_lines: list[dict[str, str]]  # malformed task lines (the first MAX_REPORTED_BAD_LINES)
    text_sets: dict[str, str]  # name -> digest
    timings: list[dict[str, Any]]
    wall_seconds: float
    table: str  # the Markdown table of the results
