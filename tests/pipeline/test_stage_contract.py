"""The dataset-stage contract, from a stage author's side: a stage written in one file against its
context alone (parallel work through ``ctx.fan_out``, outputs through ``ctx.part_outputs``, a
typed summary for downstream, metrics through ``ctx``) runs through the real runner on Ray, and a
stage two steps downstream reads its summary by type."""

from __future__ import annotations

import json
from collections import Counter
from typing import ClassVar

import pyarrow as pa
import pytest

from pipeline.config import StrictModel, load_config
from pipeline.context import UpstreamMissing
from pipeline.io import iter_parquet_batches
from pipeline.registry import register
from pipeline.runner import Runner, StageFailed
from pipeline.stage import DatasetStage, StageSummary
from stages.assets import python_doc_topics


# -- the stage under test: one file, the context alone ---------------------------------------------

class VocabSummary(StageSummary):
    kind = "test_vocab"

    documents: int
    distinct_words: int
    top: list[str]


class VocabConfig(StrictModel):
    top: int = 20


def count_words(storage, uri: str) -> dict:
    """One input file (runs as a task): word counts and documents."""
    counts: Counter = Counter()
    docs = 0
    for batch in iter_parquet_batches(storage, uri, 256, columns=["text"]):
        for text in batch.column("text").to_pylist():
            docs += 1
            counts.update(w.lower() for w in text.split() if w.isalpha())
    return {"docs": docs, "counts": dict(counts)}


@register
class Vocab(DatasetStage):
    name: ClassVar[str] = "test_vocab"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "word counts of a corpus"
    Config = VocabConfig
    requires = ("text",)
    produces = ("word", "count")
    new_rows = True
    measure_column = None
    Summary = VocabSummary

    def run(self, ctx) -> None:
        files = ctx.inputs[0].files()
        per_file = ctx.fan_out.map(count_words, [(ctx.storage, f) for f in files], step="count", num_cpus=1)
        total: Counter = Counter()
        for r in per_file:
            total.update(r["counts"])
        docs = sum(r["docs"] for r in per_file)
        ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
        out = ctx.part_outputs("words", measure_column=None)
        out.write("data", pa.table({"word": [w for w, _ in ranked], "count": [c for _, c in ranked]}))
        ctx.add_part_result(out.close(rows_in=docs))
        ctx.set_counts(rows_in=docs, kept=docs)
        ctx.log_metric("distinct_words", len(ranked))
        ctx.log_metrics({"coverage": sum(c for _, c in ranked[: self.config.top]) / max(1, sum(total.values()))}, step=self.config.top)
        ctx.set_summary(VocabSummary(documents=docs, distinct_words=len(ranked), top=[w for w, _ in ranked[: self.config.top]]))


@register
class KeepTop(DatasetStage):
    """An intermediate stage that declares no summary."""

    name: ClassVar[str] = "test_keep_top"
    requires = ("word", "count")
    produces = ("word", "count")
    new_rows = True
    measure_column = None

    def run(self, ctx) -> None:
        table = ctx.inputs[0].read_table()
        out = ctx.part_outputs("top", measure_column=None)
        out.write("data", table.slice(0, 5))
        ctx.add_part_result(out.close(rows_in=table.num_rows))


class SeenVocab(StageSummary):
    kind = "test_seen_vocab"

    top: list[str]
    from_stage: str
    documents: int


@register
class ReadVocab(DatasetStage):
    name: ClassVar[str] = "test_read_vocab"
    requires = ("word", "count")
    produces = ("word",)
    new_rows = True
    measure_column = None
    Summary = SeenVocab

    def run(self, ctx) -> None:
        vocab, stage = ctx.upstream(VocabSummary)
        ctx.set_summary(SeenVocab(top=vocab.top, from_stage=stage.ref.stage, documents=vocab.documents))
        out = ctx.part_outputs("x", measure_column=None)
        out.write("data", pa.table({"word": vocab.top}))
        ctx.add_part_result(out.close(rows_in=0))


PIPELINE = """
name: contract
work_dir: {work}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  vocab:
    uses: test_vocab
    inputs: [ingest]
    config: {{top: 10}}
  top:
    uses: test_keep_top
    inputs: [vocab]
  reader:
    uses: test_read_vocab
    inputs: [top]
"""


@pytest.fixture()
def corpus(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    texts = list(python_doc_topics().values())
    for k in range(3):  # three files: three tasks
        (data / f"docs-{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[k::3]))
    return data, texts


def test_a_dataset_stage_written_against_the_context_runs_through_the_runner(ray_local, corpus, pipeline_file, tmp_path):
    from mlflow import MlflowClient

    data, texts = corpus
    loaded = load_config(pipeline_file(PIPELINE.format(work=tmp_path / "work", data=data)))
    report = Runner(loaded).run()

    vocab = report.stage("vocab").manifest
    expected: Counter = Counter(w.lower() for t in texts for w in t.split() if w.isalpha())
    assert vocab["counts"]["rows_in"] == vocab["counts"]["kept"] == len(texts)
    assert vocab["datasets"]["data"]["rows"] == len(expected)
    assert vocab["summary"]["kind"] == "test_vocab"
    top = [w for w, _ in sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
    assert vocab["summary"]["data"] == {"documents": len(texts), "distinct_words": len(expected), "top": top}

    # read by type two stages downstream, through a stage that declares no summary
    assert report.stage("reader").manifest["summary"]["data"] == {"top": top, "from_stage": "vocab", "documents": len(texts)}

    # the stage's MLflow run: its summary metric, the metric it logged by step, its manifest
    client = MlflowClient(loaded.resolved.tracking_uri())
    run = client.get_run(report.stage("vocab").run_id)
    assert run.data.metrics["distinct_words"] == len(expected)
    history = client.get_metric_history(run.info.run_id, "coverage")
    assert [(m.step, round(m.value, 9)) for m in history] == [(10, round(sum(expected[w] for w in top) / sum(expected.values()), 9))]

    # a second run is served from the cache, summary included
    again = Runner(loaded).run()
    assert again.stage("reader").cached and again.stage("vocab").manifest["summary"] == vocab["summary"]


@register
class ReadVocabAnywhere(ReadVocab):
    name: ClassVar[str] = "test_read_vocab_anywhere"
    requires = ()


def test_a_missing_upstream_summary_is_one_clear_error(corpus, pipeline_file, tmp_path):
    data, _ = corpus
    body = f"""
name: contract
work_dir: {tmp_path / "work"}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  reader:
    uses: test_read_vocab_anywhere
    inputs: [ingest]
"""
    loaded = load_config(pipeline_file(body))
    with pytest.raises(UpstreamMissing, match=r"stage 'reader' needs a test_vocab stage upstream; none of its inputs \(ingest\) has one"):
        Runner(loaded, use_ray=False, track=False).run()


def test_a_stage_that_declares_a_summary_must_set_it(corpus, pipeline_file, tmp_path, monkeypatch):
    data, _ = corpus
    monkeypatch.setattr(Vocab, "run", lambda self, ctx: ctx.add_part_result(ctx.part_outputs("p").close(rows_in=0)))
    loaded = load_config(pipeline_file(PIPELINE.format(work=tmp_path / "work", data=data)))
    with pytest.raises(StageFailed, match="declares a VocabSummary summary but did not set one"):
        Runner(loaded, use_ray=False, track=False).run(only=None)
