"""The evaluate stage pointed at a folder of lm-eval task files: their data on s3:// (moto's server
on 127.0.0.1), the scores in the stage's data output, bad documents quarantined and counted, and a
task file lmpipe cannot run refused when the pipeline file is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.io import read_table
from pipeline.runner import Runner
from pipeline.storage import Storage
from tests.conftest import make_bucket, s3_filesystem
from tests.stages.test_evaluate_support import mmlu_like_records, tiny_run

TASK = """task: qa_s3
dataset_path: json
dataset_kwargs:
  data_files:
    test: s3://evalsets/qa/test.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
"""


def _pipeline(root: Path, tasks: Path, hf: str, s3: dict) -> Path:
    path = root / "p.yaml"
    path.write_text(f"""
name: lmeval-files
work_dir: {root / "work"}
storage:
  s3:
    endpoint_url: {s3["endpoint_url"]}
    key: ${{AWS_ACCESS_KEY_ID}}
    secret: ${{AWS_SECRET_ACCESS_KEY}}
stages:
  evaluate:
    uses: evaluate
    config:
      paths: ["{hf}"]
      lm_eval_tasks: [{{path: "{tasks}", shots: [0, 2]}}]
      batch_tokens: 1024
""")
    return path


def test_the_stage_runs_a_folder_of_task_files_with_data_on_s3(tmp_path_factory, s3_env):
    root = tmp_path_factory.mktemp("lmeval-stage")
    run = tiny_run(tmp_path_factory.getbasetemp() / "eval-tiny-run")
    make_bucket(s3_env, "evalsets")
    records = mmlu_like_records(12)
    records[3]["gold"] = 9  # out of range: quarantined, the others scored
    lines = [json.dumps(r) for r in records]
    lines.insert(5, "{truncated")
    s3_filesystem(s3_env).pipe("evalsets/qa/test.jsonl", ("\n".join(lines) + "\n").encode())
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "qa.yaml").write_text(TASK)

    report = Runner(load_config(str(_pipeline(root, tasks, run["hf"], s3_env))), use_ray=False, track=False).run()
    stage = report.stage("evaluate")
    rows = read_table(Storage(), [str(Path(stage.stage_dir) / f["path"]) for f in stage.manifest["datasets"]["data"]["files"]]).to_pylist()
    scored = {(r["task"], r["metric"]): r for r in rows}
    assert set(scored) == {(f"qa_s3_{k}shot", m) for k in (0, 2) for m in ("acc", "acc_norm", "gold_bits_per_byte")}
    assert scored[("qa_s3_0shot", "acc")]["n"] == 11  # 12 documents and an unreadable line; one gold out of range
    summary = stage.manifest["summary"]["data"]
    info = summary["tasks"]["qa_s3"]
    assert info["digest"].startswith("sha256:") and info["data"]["s3://evalsets/qa/test.jsonl"].startswith("sha256:")
    assert info["skipped_lines"]["gold_out_of_range"] == 1 and info["skipped_lines"]["invalid_json"] == 1
    bad = {b["where"]: b["reason"] for b in summary["bad_lines"]}
    assert bad["s3://evalsets/qa/test.jsonl:4"] == "gold_out_of_range" and bad["s3://evalsets/qa/test.jsonl:6"] == "invalid_json"
    samples = read_table(Storage(), [str(Path(stage.stage_dir) / f["path"]) for f in stage.manifest["datasets"]["samples"]["files"]]).to_pylist()
    zero = sorted((s for s in samples if s["task"] == "qa_s3_0shot"), key=lambda s: s["doc_id"])
    assert len(zero) == 11 and zero[0]["id"] == "s3://evalsets/qa/test.jsonl:1"
    assert zero[0]["prompt"] == records[0]["context"] and zero[0]["continuations"] == [" " + c for c in records[0]["choices"]]
    assert len(zero[0]["lls"]) == 4 and zero[0]["pred"] == max(range(4), key=lambda i: zero[0]["lls"][i])
    assert json.loads(zero[0]["target"]) == records[0]["gold"] and json.loads(zero[0]["metrics"])["acc"] == float(zero[0]["pred"] == records[0]["gold"])
    # 2-shot: a document whose shots include the bad one is quarantined too (counts add up: 13 lines)
    assert scored[("qa_s3_2shot", "acc")]["n"] + info["skipped_lines"].get("bad_fewshot_document", 0) == 11


def test_a_task_file_lmpipe_cannot_run_is_refused_when_the_pipeline_loads(tmp_path_factory, s3_env):
    root = tmp_path_factory.mktemp("lmeval-refused")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "qa.yaml").write_text(TASK + "process_docs: !function utils.process_docs\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(_pipeline(root, tasks, str(root / "model"), s3_env)))
    assert "lm_eval_tasks" in str(e.value) and f"{tasks / 'qa.yaml'}:11: process_docs:" in str(e.value)
