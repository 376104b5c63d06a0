"""``train_classifier``: a fastText classifier trained inside the pipeline (DCLM's recipe).

Positives are the documents of one source of the input (``positive: {source: ...}``) or the
texts of a reference file (``positive: {file: ...}``: JSONL with a ``text`` field, or text with
one document per line); negatives are another source, or every input document that is not a
positive, sampled. Each class keeps at most ``max_per_class`` documents: those with the smallest
keyed hash of their id (seeded, so the same input and seed pick the same documents, however the
input is split into files). A hashed ``validation_fraction`` of them is held out; precision,
recall, accuracy and ROC AUC on it are logged. Training runs on one thread with the stage's
seed, so the model file is the same bytes run after run (its sha256 is in the summary).

Outputs: the model file (``<attempt>/classifier.bin``) and, as the ``data`` dataset, one row per
labelled document (id, source, label, split, score on the held-out rows): what the model was
trained on, for lineage.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import tempfile
from typing import Any, Iterator, Optional

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline import storage as st
from pipeline.config import PathStr, StrictModel
from pipeline.context import ExternalInput, StageContext
from pipeline.io import iter_parquet_batches
from pipeline.registry import register
from pipeline.stage import DatasetStage, Resources
from stages.classifier.fasttext_text import LABEL_PREFIX, NORMALIZATION, fasttext_line, roc_auc
from stages.summaries.classifier import ClassifierSummary

MODEL_FILE = "classifier.bin"


class LabelSource(StrictModel):
    source: Optional[str] = Field(default=None, description="the input's documents of this source")
    file: Optional[PathStr] = Field(default=None, description="reference texts: .jsonl (a text field), a text file (one document per"
                                                              " line) or a folder (one document per file)")

    @model_validator(mode="after")
    def _one(self) -> "LabelSource":
        if (self.source is None) == (self.file is None):
            raise ValueError("set exactly one of source or file")
        return self


class FastTextParams(StrictModel):
    epoch: int = Field(default=5, ge=1)
    lr: float = Field(default=0.1, gt=0)
    word_ngrams: int = Field(default=2, ge=1)
    dim: int = Field(default=64, ge=2)
    bucket: int = Field(default=200_000, ge=1000, description="hash buckets of word n-grams (model size: bucket x dim x 4 bytes)")
    min_count: int = Field(default=1, ge=1)


class TrainClassifierConfig(StrictModel):
    positive: LabelSource
    negative: Optional[LabelSource] = Field(default=None, description="default: every input document that is not a positive")
    positive_label: str = Field(default="hq", pattern=r"^[A-Za-z0-9_\-]+$")
    negative_label: str = Field(default="cc", pattern=r"^[A-Za-z0-9_\-]+$")
    max_per_class: int = Field(default=50_000, ge=1)
    max_chars: int = Field(default=20_000, ge=1, description="characters of a document used (DCLM reads the start of a page)")
    validation_fraction: float = Field(default=0.1, ge=0, lt=1)
    fasttext: FastTextParams = Field(default_factory=FastTextParams)

    @model_validator(mode="after")
    def _distinct(self) -> "TrainClassifierConfig":
        if self.positive_label == self.negative_label:
            raise ValueError("positive_label and negative_label must differ")
        if self.negative is not None and self.negative == self.positive:
            raise ValueError("positive and negative are the same")
        return self


def _key(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()[:8], "big")


def _held_out(key: int, fraction: float) -> bool:
    return (key & 0xFFFF) < fraction * 0x10000  # low bits: independent of the sampling order (high bits)


def reference_files(storage: st.Storage, uri: str) -> list[str]:
    return sorted(storage.find_files(uri)) if storage.isdir(uri) else [uri]


def read_reference_texts(storage: st.Storage, uri: str) -> Iterator[tuple[str, str]]:
    """(id, text) of a reference file -- JSONL with a ``text`` field, or one document per line --
    or of a folder, each of its files one document."""
    if storage.isdir(uri):
        for path in reference_files(storage, uri):
            text = storage.read_bytes(path).decode("utf-8")
            if text.strip():
                yield f"file:{hashlib.sha1(text.encode()).hexdigest()[:20]}", text
        return
    data = storage.read_bytes(uri).decode("utf-8")
    jsonl = uri.endswith((".jsonl", ".ndjson"))
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{uri}:{n}: not a JSON object with a text field ({e})") from None
        else:
            text = line
        yield f"file:{hashlib.sha1(text.encode()).hexdigest()[:20]}", text


@register
class TrainClassifier(DatasetStage):
    name = "train_classifier"
    version = "1"
    description = "Train a fastText classifier (positives: a source or a file of reference texts; negatives: sampled from the input), seeded and held-out evaluated."
    Config = TrainClassifierConfig
    requires = ("id", "text", "source")
    produces = ("id", "source", "label", "split", "score")
    new_rows = True
    measure_column = None
    uses_seed = True
    resources = Resources(num_cpus=1)
    libraries = ("pyarrow", "fasttext-numpy2")
    Summary = ClassifierSummary

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        specs = [s.file for s in (self.config.positive, self.config.negative) if s is not None and s.file is not None]
        return [ExternalInput("reference_texts", f, tuple({"uri": p, **ctx.storage.file_identity(p)} for p in reference_files(ctx.storage, f)))
                for f in specs]

    def _label_of(self, source: str) -> Optional[str]:
        c = self.config
        if c.positive.source is not None and source == c.positive.source:
            return c.positive_label
        if c.negative is None:
            return c.negative_label
        if c.negative.source is not None and source == c.negative.source:
            return c.negative_label
        return None

    def _sample(self, ctx: StageContext) -> dict[str, list[tuple[int, str, str, str]]]:
        """Per label, the max_per_class (key, id, source, text) with the smallest keys."""
        c = self.config
        heaps: dict[str, list] = {c.positive_label: [], c.negative_label: []}

        def offer(label: str, doc_id: str, source: str, text: str) -> None:
            item = (-_key(self.seed, doc_id), doc_id, source, text[:c.max_chars])
            heap = heaps[label]
            if len(heap) < c.max_per_class:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)

        for uri in ctx.inputs[0].files():
            for batch in iter_parquet_batches(ctx.storage, uri, 4096, columns=["id", "source", "text"]):
                for doc_id, source, text in zip(*(batch.column(n).to_pylist() for n in ("id", "source", "text"))):
                    label = self._label_of(source)
                    if label is not None and text:
                        offer(label, doc_id, source, text)
        for spec, label in ((c.positive, c.positive_label), (c.negative, c.negative_label)):
            if spec is not None and spec.file is not None:
                for doc_id, text in read_reference_texts(ctx.storage, spec.file):
                    offer(label, doc_id, "reference_file", text)
        out = {}
        for label, heap in heaps.items():
            if not heap:
                raise ValueError(f"train_classifier: no documents for label {label!r}; check positive/negative and the input's sources")
            out[label] = sorted((-k, i, s, t) for k, i, s, t in heap)
        return out

    def run(self, ctx: StageContext) -> None:
        import fasttext

        c = self.config
        sample = self._sample(ctx)
        train, valid = [], []
        for label, items in sample.items():
            for key, doc_id, source, text in items:
                (valid if _held_out(key, c.validation_fraction) else train).append((key, label, doc_id, source, text))
        train.sort()
        valid.sort()
        p = c.fasttext
        with tempfile.TemporaryDirectory(prefix="lmpipe-fasttext-") as tmp:
            train_path = os.path.join(tmp, "train.txt")
            with open(train_path, "w", encoding="utf-8") as f:
                for _, label, _, _, text in train:
                    f.write(f"{LABEL_PREFIX}{label} {fasttext_line(text, c.max_chars)}\n")
            try:
                model = fasttext.train_supervised(train_path, epoch=p.epoch, lr=p.lr, wordNgrams=p.word_ngrams, dim=p.dim,
                                                  bucket=p.bucket, minCount=p.min_count, thread=1, seed=self.seed % (2**31), verbose=0)
            except RuntimeError as e:  # fastText diverges ("Encountered NaN") when lr is too high for the data
                raise ValueError(f"train_classifier: fastText training failed ({e}) on {len(train)} rows; lower"
                                 f" fasttext.lr (now {p.lr}) or raise fasttext.dim (now {p.dim})") from None
            model_path = os.path.join(tmp, MODEL_FILE)
            model.save_model(model_path)
            with open(model_path, "rb") as f:
                data = f.read()
        rel = f"{ctx.attempt}/{MODEL_FILE}"
        ctx.storage.write_bytes_atomic(st.join(ctx.stage_dir, rel), data)

        scores = [_positive_probability(model, fasttext_line(t, c.max_chars), c.positive_label) for _, _, _, _, t in valid]
        metrics = _metrics(scores, [label == c.positive_label for _, label, _, _, _ in valid])
        for name, value in metrics.items():
            ctx.log_metric(f"validation_{name}", value)
        counts = lambda rows: {lab: sum(1 for r in rows if r[1] == lab) for lab in (c.positive_label, c.negative_label)}  # noqa: E731
        ctx.set_summary(ClassifierSummary(path=rel, sha256=hashlib.sha256(data).hexdigest(), positive_label=c.positive_label,
                                          negative_label=c.negative_label, normalization=NORMALIZATION,
                                          train_rows=counts(train), validation_rows=counts(valid), metrics=metrics))
        out = ctx.part_outputs("00000", measure_column=None)
        rows = [(d, s, lab, "train", None) for _, lab, d, s, _ in train] + \
               [(d, s, lab, "validation", score) for (_, lab, d, s, _), score in zip(valid, scores)]
        out.write("data", pa.table({name: pa.array([r[i] for r in rows], typ) for i, (name, typ) in enumerate(
            [("id", pa.string()), ("source", pa.string()), ("label", pa.string()), ("split", pa.string()), ("score", pa.float64())])}))
        ctx.add_part_result(out.close(rows_in=len(rows)))


def _positive_probability(model: Any, line: str, positive_label: str) -> float:
    labels, probs = model.predict(line, k=-1)
    return next((float(p) for lab, p in zip(labels, probs) if lab == LABEL_PREFIX + positive_label), 0.0)


def _metrics(scores: list[float], positive: list[bool]) -> dict[str, float]:
    predicted = [s >= 0.5 for s in scores]
    tp = sum(1 for p, y in zip(predicted, positive) if p and y)
    fp = sum(1 for p, y in zip(predicted, positive) if p and not y)
    fn = sum(1 for p, y in zip(predicted, positive) if not p and y)
    correct = sum(1 for p, y in zip(predicted, positive) if p == y)
    return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
            "accuracy": correct / len(scores) if scores else 0.0, "auc": roc_auc(scores, positive), "rows": float(len(scores))}
