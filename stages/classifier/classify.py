"""``classify``: score documents with a fastText model and keep or drop them by a threshold.

The model is one a ``train_classifier`` stage trained (list that stage as the second input), or
a user's file (``model_path``, pinned by ``model_sha256``; e.g. DCLM's quality model or Dolma's
Jigsaw toxicity models). Every row gets ``<name>_score``: the probability of ``label``. With
``min_score`` a row below it is rejected as ``<name>_below_min_score``; with ``max_score`` one
above it as ``<name>_above_max_score`` (a toxicity model). Without either, rows are only scored
(change a threshold later without scoring again, as Dolma's taggers do).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Iterator, Optional

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline import storage as st
from pipeline.config import PathStr, StrictModel
from pipeline.context import ExternalInput, PartContext, StageContext
from pipeline.io import iter_parquet_batches
from pipeline.registry import register
from pipeline.stage import DROP_REASON, PART_WRITERS, DatasetStage, Part, Resources
from stages.classifier.fasttext_text import LABEL_PREFIX, fasttext_line
from stages.summaries.classifier import ClassifierSummary


class ClassifyConfig(StrictModel):
    name: str = Field(default="quality", pattern=r"^[a-z][a-z0-9_]*$", description="prefix of the score column and reasons")
    model_path: Optional[PathStr] = Field(default=None, description="a fastText .bin/.ftz; default: the train_classifier input's model")
    model_sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="required with model_path")
    label: Optional[str] = Field(default=None, description="the label whose probability is the score (without __label__);"
                                                           " default: the trained model's positive label")
    min_score: Optional[float] = Field(default=None, ge=0, le=1)
    max_score: Optional[float] = Field(default=None, ge=0, le=1)
    max_chars: int = Field(default=20_000, ge=1, description="characters of a document scored (as in training)")
    batch_rows: int = Field(default=2048, ge=1)

    @model_validator(mode="after")
    def _model(self) -> "ClassifyConfig":
        if (self.model_path is None) != (self.model_sha256 is None):
            raise ValueError("model_path and model_sha256 go together: a user's model is pinned by its sha256")
        if self.model_path is not None and self.label is None:
            raise ValueError("with model_path, set label (the label whose probability is the score)")
        return self


@register
class Classify(DatasetStage):
    name = "classify"
    version = "1"
    description = "Score documents with a fastText model (trained upstream or a pinned file) and keep/drop them by a threshold."
    Config = ClassifyConfig
    requires = ("text",)
    produces = ()  # plus <name>_score, named by the config
    outputs = ("data", "rejected")
    num_inputs = (1, 2)
    row_preserving = True
    writes_through = PART_WRITERS
    resources = Resources(num_cpus=1, actors=True)
    libraries = ("pyarrow", "fasttext-numpy2")

    def __init__(self, config: ClassifyConfig, seed: int = 0):
        super().__init__(config, seed)
        self._model: Any = None
        self._model_uri: Optional[str] = None

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        path = self.config.model_path
        return [] if path is None else [ExternalInput("classifier_model", path, ({"uri": path, **ctx.storage.file_identity(path)},))]

    def fingerprint_extras(self, ctx: StageContext) -> dict[str, Any]:
        return {"model_sha256": self.config.model_sha256} if self.config.model_sha256 else {}

    # -- driver ----------------------------------------------------------------------------------
    def _resolve_model(self, ctx: StageContext) -> tuple[str, str, str]:
        """(model uri, sha256, label) from the config or the train_classifier input."""
        c = self.config
        if c.model_path is not None:
            data = ctx.storage.read_bytes(c.model_path)
            digest = hashlib.sha256(data).hexdigest()
            if digest != c.model_sha256:
                raise ValueError(f"classify: {c.model_path}: sha256 {digest} is not the pinned model_sha256 {c.model_sha256}")
            return c.model_path, digest, c.label
        summary, source = ctx.upstream(ClassifierSummary)
        uri = source.path(summary.path)
        return uri, summary.sha256, c.label or summary.positive_label

    def run(self, ctx: StageContext) -> None:
        documents = next((i for i in ctx.inputs if i.summary_kind != ClassifierSummary.kind), None)
        if documents is None:
            raise ValueError("classify: no input of documents (the inputs are a classifier and nothing else)")
        uri, digest, label = self._resolve_model(ctx)
        ctx.log_metric("model_bytes", ctx.storage.size(uri))
        parts = [Part(f"{i:05d}", {"uri": f, "model": uri, "sha256": digest, "label": label})
                 for i, f in enumerate(documents.files())]
        ctx.run_parts(parts)

    # -- workers ---------------------------------------------------------------------------------
    def _load(self, storage: st.Storage, uri: str, digest: str) -> Any:
        if self._model_uri != uri:  # once per actor
            import fasttext

            data = storage.read_bytes(uri)
            if hashlib.sha256(data).hexdigest() != digest:
                raise ValueError(f"classify: {uri} changed since the stage started (sha256)")
            with tempfile.TemporaryDirectory(prefix="lmpipe-classify-") as tmp:
                path = os.path.join(tmp, "model" + (".ftz" if uri.endswith(".ftz") else ".bin"))
                with open(path, "wb") as f:
                    f.write(data)
                self._model = fasttext.load_model(path)
            self._model_uri = uri
        return self._model

    def process_part(self, part: Part, ctx: PartContext) -> Iterator[pa.Table]:
        p = part.payload
        model = self._load(ctx.storage, p["model"], p["sha256"])
        target = LABEL_PREFIX + p["label"]
        ctx.count("bytes_in", ctx.storage.size(p["uri"]))
        for batch in iter_parquet_batches(ctx.storage, p["uri"], self.config.batch_rows):
            ctx.count("rows_in", batch.num_rows)
            yield self.score_batch(batch, model, target)

    def score_batch(self, batch: pa.Table, model: Any, target: str) -> pa.Table:
        c = self.config
        texts = batch.column("text").to_pylist()
        lines = [fasttext_line(t or "", c.max_chars) for t in texts]
        labels, probs = model.predict(lines, k=-1) if lines else ([], [])
        scores = [next((float(p) for lab, p in zip(ls, ps) if lab == target), 0.0) for ls, ps in zip(labels, probs)]
        reasons = []
        for s in scores:
            if c.min_score is not None and s < c.min_score:
                reasons.append(f"{c.name}_below_min_score")
            elif c.max_score is not None and s > c.max_score:
                reasons.append(f"{c.name}_above_max_score")
            else:
                reasons.append(None)
        out = batch.append_column(f"{c.name}_score", pa.array(scores, pa.float64()))
        return out.append_column(DROP_REASON, pa.array(reasons, pa.string()))

