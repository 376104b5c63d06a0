"""The evaluate stage in a pipeline on local Ray: two checkpoints x (one task group + bits per
byte) as Ray tasks, results in the data output, MLflow metrics keyed by tokens seen and linked to
the model and the task's digest, the table and plot as artifacts, ``lmpipe eval-table``.

The train and tokenize stages are stood in for by two small fixture stages that commit what the
real ones do (checkpoint rows + a train summary, validation shards + a tokenize summary)
for a tiny model trained in-process, so the test needs no Ray Train run (~25 s)."""

from __future__ import annotations

import json
import os
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


def _stage_rows(stage, dataset: str) -> list[dict]:
    from pipeline.io import read_table

    files = stage.manifest["datasets"][dataset]["files"]
    return read_table(st.Storage(), [st.join(stage.stage_dir, f["path"]) for f in files]).to_pylist()


def _checkpoint_evaluator(pipeline_run, **settings):
    """The train stage's checkpoint evaluation, built as its driver builds it, for the entries this
    pipeline's evaluate stage scores (the same task, text set and validation split)."""
    from stages.scoring.checkpoint_eval import build_evaluator
    from stages.scoring.entries import TaskEntry, TextSetEntry
    from stages.tokenize.validation import first_per_domain
    from stages.train.config import CheckpointEvalConfig

    evaluate = pipeline_run["loaded"].resolved_stage_configs["evaluate"]
    tokenize = pipeline_run["report"].stage("tokenize")
    summary = tokenize.manifest["summary"]["data"]
    config = CheckpointEvalConfig(tasks=[TaskEntry(**t.model_dump()) for t in evaluate.tasks],
                                  text_sets=[TextSetEntry(**s.model_dump()) for s in evaluate.text_sets],
                                  **{"batch_tokens": evaluate.batch_tokens, **settings})
    storage = st.Storage()
    validation = first_per_domain([st.join(tokenize.stage_dir, f["path"]) for f in tokenize.manifest["datasets"]["validation"]["files"]],
                                  storage, config.validation_max_sequences)
    tokenizer = st.join(tokenize.stage_dir, summary["tokenizer_path"])
    return build_evaluator(config, storage.read_bytes(tokenizer).decode(), summary["bos_id"], summary["eos_id"], tokenizer, validation, storage)


def test_checkpoints_scored_during_training_are_reused_with_identical_results(pipeline_run):
    """What the train stage's checkpoint evaluation stores beside each checkpoint (the function Ray
    Train calls as a checkpoint commits) the evaluate stage reads instead of scoring again, and its
    outputs are the ones it computes itself; another setting (another fingerprint) is not reused."""
    from pipeline.runner import Runner
    from stages.scoring.checkpoint_eval import ERROR_KEY, RESULTS_KEY

    computed = pipeline_run["report"].stage("evaluate")
    checkpoints = computed.manifest["summary"]["data"]["checkpoints"]
    expected = {dataset: _stage_rows(computed, dataset) for dataset in ("data", "examples")}  # a forced rerun replaces them
    other = _checkpoint_evaluator(pipeline_run, batch_tokens=2048)(checkpoints[0]["path"], checkpoints[0]["step"], checkpoints[0]["tokens_seen"])
    assert ERROR_KEY not in other and len(other[RESULTS_KEY]) == 2
    rerun = Runner(pipeline_run["loaded"]).run(only="evaluate", force=True).stage("evaluate")
    assert rerun.manifest["summary"]["data"]["reused_jobs"] == 0  # stored under another fingerprint: recomputed

    evaluator = _checkpoint_evaluator(pipeline_run)
    for ck in checkpoints:
        scored = evaluator(ck["path"], ck["step"], ck["tokens_seen"])
        assert ERROR_KEY not in scored and all(os.path.isfile(uri) for uri in scored[RESULTS_KEY])
        assert scored["checkpoint_eval/qa_0shot/acc"] == next(
            r["value"] for r in expected["data"] if r["step"] == ck["step"] and r["task"] == "qa_0shot" and r["metric"] == "acc")
    reused = Runner(pipeline_run["loaded"]).run(only="evaluate", force=True).stage("evaluate")
    assert reused.manifest["summary"]["data"]["reused_jobs"] == 4  # 2 checkpoints x (the qa group, the text group)
    for dataset in ("data", "examples"):
        assert _stage_rows(reused, dataset) == expected[dataset]


def test_a_failing_checkpoint_evaluation_is_one_line_and_no_exception(pipeline_run, tmp_path, caplog):
    from stages.scoring.checkpoint_eval import ERROR_KEY

    missing = str(tmp_path / "checkpoint_removed_by_keep")
    evaluator = _checkpoint_evaluator(pipeline_run)  # (it warns of the task file's malformed line)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmpipe.train"):
        out = evaluator(missing, 7, 100)
    assert out == {ERROR_KEY: f"checkpoint evaluation of step 7 ({missing}) failed: CheckpointError: checkpoint {missing}: no such folder"}
    assert [r.getMessage() for r in caplog.records] == [out[ERROR_KEY]]
