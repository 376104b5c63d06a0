"""What a ``train_classifier`` stage tells the stages after it (``classify``)."""

from __future__ import annotations

from pipeline.contracts import StageSummary


class ClassifierSummary(StageSummary):
    kind = "classifier"

    path: str  # the fastText model, relative to the stage's folder
    sha256: str
    positive_label: str  # fastText labels without the __label__ prefix
    negative_label: str
    normalization: str  # how texts were prepared (classify prepares them the same way)
    train_rows: dict[str, int]  # per label
    validation_rows: dict[str, int]
    metrics: dict[str, float]  # on the validation rows: precision, recall, auc, accuracy at 0.5
