"""What a ``train`` stage tells the stages after it (evaluation, export, release)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict

from pipeline.contracts import StageSummary
from pipeline.types import StrictModel


class ResumedFrom(StrictModel):
    """The checkpoint a run continued (``checkpoint.resume_from``): its lineage."""

    checkpoint: str
    step: int
    tokens_seen: int
    world_size: int  # the workers that wrote it (this run may have another number)


class SkippedStep(BaseModel):
    """An optimizer step the trainer skipped (a loss spike or a non-finite loss or gradient)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: int
    loss: Optional[float]
    grad_norm: Optional[float]
    reason: str


class CheckpointEvaluation(BaseModel):
    """The train stage's checkpoint evaluation (``checkpoint_eval``) of one committed checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    step: int
    path: str
    status: str  # "scored", "failed", "timed out or not run"
    error: Optional[str] = None  # one line, when it failed
    results: list[str] = []  # the stored results (one per evaluation task), beside the checkpoint


class TrainSummary(StageSummary):
    kind = "train"

    final_checkpoint: str
    steps: int
    tokens_seen: int
    hf_export: Optional[str] = None  # the Hugging Face export of the final checkpoint (None: not exportable)
    hf_export_error: Optional[str] = None
    mlflow_model_id: Optional[str] = None  # the export's LoggedModel, when tracked
    tokenizer: Optional[str] = None  # the tokenizer's file name inside the export
    ray_train_run: Optional[str] = None
    world_size: int = 1
    # the model's shape: ModelConfig.to_dict(), field -> value (ModelConfig itself lives with torch)
    model: dict[str, Union[int, float, str, bool, None]] = {}
    num_params: Optional[int] = None
    flops_per_token: Optional[float] = None
    final_loss: Optional[float] = None
    final_val_loss: Optional[float] = None
    skipped_steps: list[SkippedStep] = []
    clip_events: int = 0
    resumed_from: Optional[ResumedFrom] = None  # None: trained from step 0
    checkpoint_evaluations: list[CheckpointEvaluation] = []  # with checkpoint_eval: each kept checkpoint's evaluation
