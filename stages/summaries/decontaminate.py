"""What a ``decontaminate`` stage records about its run, in its manifest's ``summary``: where its
n-gram index is and how much of each evaluation task it found in the corpus."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pipeline.contracts import StageSummary


class TaskContamination(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    examples: int  # examples of the task
    examples_indexed: int  # of those, with text long enough to index
    examples_found: int  # examples whose text occurs in the corpus
    fraction_found: float
    docs: int  # corpus documents that contain a task's text
    chars: int  # characters of those documents that matched
    docs_rejected: int
    docs_redacted: int
    sources: dict[str, int]  # source -> contaminated documents


class DecontaminateSummary(StageSummary):
    kind = "decontaminate"

    index_path: str  # the n-gram index, relative to the stage's folder
    index_bytes: int
    tasks: dict[str, TaskContamination]
