"""The evaluate stage in a pipeline on local Ray: two checkpoints x (one task group + bits per
byte) as Ray tasks, results in the data output, MLflow metrics keyed by tokens seen and linked to
the model and the task's digest, the table and plot as artifacts, ``lmpipe eval-table``.

The train and tokenize stages are stood in for by two small fixture stages that commit what the
real ones do (checkpoint rows + a train summary, validation shards + a tokenize summary)
for a tiny model trained in-process, so the test needs no Ray Train run (~25 s)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest

from pipeline import storage as st
from pipeline.config import StrictModel
from pipeline.registry import register
from pipeline.stage import DatasetStage
from pipeline.tracking import ModelRecord
from stages.summaries.tokenize import TokenizeSummary
from stages.summaries.train import TrainSummary
from tests.stages.test_evaluate_support import mmlu_like_records, tiny_run, write_task


class FixtureConfig(StrictModel):
    run_dir: str


@register
class EvalFixtureTokenize(DatasetStage):
    name: ClassVar[str] = "eval_fixture_tokenize"
    Config = FixtureConfig
    num_inputs = (0, 0)
    outputs = ("train", "validation")
    output_formats = {"train": "arrow", "validation": "arrow"}
    measure_column = None
    Summary = TokenizeSummary

    def run(self, ctx) -> None:
        from stages.tokenize.shards import read_token_table

        info = json.loads((Path(self.config.run_dir) / "run.json").read_text())
        out = ctx.part_outputs("shards", measure_column=None, formats=dict(self.output_formats))
        for split in ("train", "validation"):
            out.write(split, read_token_table(info[split], None, ["tokens", "source"]))
        ctx.add_part_result(out.close(rows_in=0))
        rel = f"{ctx.attempt}/tokenizer.json"
        shutil.copyfile(info["tokenizer"], st.join(ctx.stage_dir, rel))
        ctx.set_summary(TokenizeSummary(seq_len=64, vocab_size=512, dtype="uint16", bos_id=0, eos_id=1, pad_id=2, tokenizer_path=rel))


@register
class EvalFixtureTrain(DatasetStage):
    name: ClassVar[str] = "eval_fixture_train"
    Config = FixtureConfig
    measure_column = None
    Summary = TrainSummary

    def run(self, ctx) -> None:
        info = json.loads((Path(self.config.run_dir) / "run.json").read_text())
        steps = [int(Path(p).name.split("_")[1]) for p in info["checkpoints"]]
        rows = [{"step": s, "tokens_seen": s * info["tokens_per_step"], "path": p, "final": i == len(steps) - 1}
                for i, (s, p) in enumerate(zip(steps, info["checkpoints"]))]
        out = ctx.part_outputs("checkpoints", measure_column=None)
        out.write("data", pa.Table.from_pylist(rows))
        ctx.add_part_result(out.close(rows_in=0))
        model_id = ctx.log_model(ModelRecord(name="train", local_dir=info["hf"], model_type="LlamaForCausalLM", step=steps[-1]))
        ctx.set_summary(TrainSummary(hf_export=info["hf"], final_checkpoint=info["checkpoints"][-1], steps=steps[-1],
                                     tokens_seen=rows[-1]["tokens_seen"], mlflow_model_id=model_id))


PIPELINE = """
name: evaluate-test
work_dir: {work}
seed: 3
mlflow: {{tracking_uri: "sqlite:///{work}/mlflow.db"}}
stages:
  tokenize:
    uses: eval_fixture_tokenize
    config: {{run_dir: "{run}"}}
  train:
    uses: eval_fixture_train
    inputs: [tokenize.train]
    config: {{run_dir: "{run}"}}
  evaluate:
    uses: evaluate
    inputs: [train]
    config:
      checkpoints: all
      tasks: [{{name: qa, path: "{task}", shots: [0, 1]}}]
      text_sets: [{{name: docs, path: "{docs}", domain_field: kind}}]
      batch_tokens: 1024
"""


@pytest.fixture(scope="module")
def pipeline_run(ray_local, tmp_path_factory):
    from pipeline.config import load_config
    from pipeline.runner import Runner

    root = tmp_path_factory.mktemp("eval-pipeline")
    run = tiny_run(tmp_path_factory.getbasetemp() / "eval-tiny-run")
    lines = [json.dumps(r) for r in mmlu_like_records(20)]
    lines.insert(3, json.dumps({"id": "bad", "context": "Q?", "choices": ["a", "b"], "gold": 5}))
    task = root / "qa.jsonl"
    task.write_text("\n".join(lines) + "\n")
    docs = write_task(root / "docs.jsonl", [{"text": r["context"], "kind": "question" if i % 2 else "prompt"} for i, r in enumerate(mmlu_like_records(10))])
    path = root / "pipeline.yaml"
    path.write_text(PIPELINE.format(work=root / "work", run=tmp_path_factory.getbasetemp() / "eval-tiny-run", task=task, docs=docs))
    loaded = load_config(str(path))
    report = Runner(loaded).run()
    return {"report": report, "run": run, "loaded": loaded, "path": str(path), "task": str(task)}


def test_every_checkpoint_and_task_group_is_scored(pipeline_run):
    from pipeline.io import read_table

    stage = pipeline_run["report"].stage("evaluate")
    m = stage.manifest
    ev = m["summary"]["data"]
    assert [c["step"] for c in ev["checkpoints"]] == [15, 30]
    rows = read_table(st.Storage(), [st.join(stage.stage_dir, f["path"]) for f in m["datasets"]["data"]["files"]]).to_pylist()
    by = {(r["step"], r["task"], r["metric"]): r for r in rows}
    for step in (15, 30):
        for key in ("qa_0shot", "qa_1shot"):
            assert by[(step, key, "acc")]["n"] == 20 and 0 <= by[(step, key, "acc")]["value"] <= 1
            assert by[(step, key, "acc")]["stderr"] > 0
        for domain in ("prompt", "question", "_macro"):
            assert by[(step, f"docs/{domain}", "bits_per_byte")]["value"] > 0
    assert m["datasets"]["examples"]["rows"] == 2 * 2 * 20
    assert ev["tasks"]["qa"]["skipped_lines"] == {"gold_out_of_range": 1}
    assert ev["bad_lines"][0]["where"] == f"{pipeline_run['task']}:4"
    assert m["metrics"]["evaluation_tasks"] == 4  # Ray tasks: 2 checkpoints x (the qa group, the bits-per-byte group)
    assert all(t["device"] == "cpu" for t in ev["timings"])
    for domain in ("questions", "answers", "_macro"):  # the validation split, found through the train stage's input
        assert by[(30, f"validation/{domain}", "bits_per_byte")]["value"] > 0


def test_mlflow_gets_metrics_by_tokens_seen_linked_to_model_and_task(pipeline_run):
    from mlflow import MlflowClient

    stage = pipeline_run["report"].stage("evaluate")
    client = MlflowClient(tracking_uri=pipeline_run["loaded"].resolved.tracking_uri())
    history = client.get_metric_history(stage.run_id, "qa_0shot/acc")
    assert sorted(h.step for h in history) == [15 * 512, 30 * 512]
    assert {h.step for h in client.get_metric_history(stage.run_id, "docs/_macro/bits_per_byte")} == {15 * 512, 30 * 512}
    run = client.get_run(stage.run_id)
    assert run.data.tags["mlflow.parentRunId"] == pipeline_run["report"].pipeline_run_id
    names = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert "task:qa" in names and len(names["task:qa"]) == 36
    model_id = pipeline_run["report"].stage("train").manifest["summary"]["data"]["mlflow_model_id"]
    assert [m.model_id for m in run.inputs.model_inputs] == [model_id]
    linked = client.get_logged_model(model_id).metrics or []
    assert any(m.key == "qa_0shot/acc" and m.dataset_name == "task:qa" for m in linked)
    artifacts = {a.path for a in client.list_artifacts(stage.run_id)}
    assert {"eval_table.md", "eval_table.csv", "eval_metrics.png", "bad_task_lines.txt"} <= artifacts
    # the checkpoint saved during training gets a LoggedModel of its own, named after pipeline, model and step
    models = {m.name: m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id])}
    mid = models["evaluate-test-train-step15"]
    assert mid.source_run_id == stage.run_id and mid.tags["lmpipe.step"] == "15"
    linked = client.get_logged_model(mid.model_id).metrics or []
    assert any(m.key == "qa_0shot/acc" and m.step == 15 * 512 and m.dataset_name == "task:qa" for m in linked)
    assert not any(m.step == 30 * 512 for m in linked)  # the final checkpoint's scores go to the train stage's model


def test_eval_table_cli_by_path_and_by_run(pipeline_run, capsys):
    from pipeline.cli import main

    stage = pipeline_run["report"].stage("evaluate")
    assert main(["eval-table", stage.stage_dir]) == 0
    by_path = capsys.readouterr().out
    header = by_path.splitlines()[0]
    assert "7.68K tok (step 15)" in header and "15.4K tok (step 30)" in header
    assert any(line.startswith("| qa_5shot") or line.startswith("| qa_0shot | acc (%)") for line in by_path.splitlines())
    assert main(["eval-table", pipeline_run["report"].pipeline_run_id, "--config", pipeline_run["path"]]) == 0
    assert capsys.readouterr().out == by_path


def test_rerun_is_cached(pipeline_run):
    from pipeline.runner import Runner

    again = Runner(pipeline_run["loaded"]).run()
    assert again.stage("evaluate").cached
