"""What to score, as a pipeline file names it: multiple-choice tasks and held-out text sets. One
definition for the ``evaluate`` stage and the train stage's checkpoint evaluation, so the same
entry builds the same requests in both (and their results can be reused across them). Pydantic
only: the registry imports this with every stage's config, before torch."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from pipeline.config import PathStr, StrictModel


class TaskEntry(StrictModel):
    name: str = Field(min_length=1, description="built-in task (mmlu) or a name for the file in path")
    path: Optional[PathStr] = Field(default=None, description="JSONL task file (id, context, choices, gold), local or s3://")
    shots: list[int] = Field(default_factory=lambda: [0], description="few-shot counts to evaluate, e.g. [0, 5]")
    prompt: Optional[Literal["plain", "mmlu"]] = Field(default=None, description="prompt format; default mmlu for the built-in mmlu, else plain")
    limit: Optional[int] = Field(default=None, ge=1, description="evaluate this many examples, spread evenly over the task")

    @field_validator("shots")
    @classmethod
    def _shots(cls, v):
        if not v or any(s < 0 for s in v) or len(set(v)) != len(v):
            raise ValueError("shots must be distinct non-negative integers")
        return v

    def prompt_format(self) -> Literal["plain", "mmlu"]:
        return self.prompt or ("mmlu" if self.name == "mmlu" and self.path is None else "plain")


class TextSetEntry(StrictModel):
    name: str = Field(min_length=1)
    path: PathStr = Field(description="JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet file of documents")
    text_field: str = "text"
    domain_field: Optional[str] = Field(default=None, description="column with each document's domain (default: one domain, the set's name)")
    max_docs: Optional[int] = Field(default=None, ge=1)
