"""Worker processes serve several stages of a run (imports paid once, a stage's setup once per
process): reuse must not leak state between stages or parts. Two stages of one class with
different configs run on shared processes, and give byte-identical outputs to the same pipeline
on a new process per part (LMPIPE_FRESH_WORKERS=1) and one worker."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq

import tests.pipeline.worker_state_stage  # noqa: F401  (registers tag_rows)
from pipeline.config import load_config
from pipeline.fanout import FRESH_WORKERS_ENV
from pipeline.runner import Runner

PARTS = 3


def run_pipeline(root: Path, data: Path, fresh: bool, max_workers: int, monkeypatch) -> tuple[dict, dict[str, list[str]]]:
    """Run ingest -> a (tag a) -> b (tag b); returns every data file's digest per stage and the
    setups per tag (one entry per setup: the process it ran in)."""
    trace = root / "trace"
    trace.mkdir(parents=True)
    path = root / "p.yaml"
    tagging = "\n".join(f"""  {tag}:
    uses: tag_rows
    inputs: [{upstream}]
    resources: {{max_workers: {max_workers}}}
    config: {{tag: {tag}, trace_dir: "{trace}"}}""" for tag, upstream in (("a", "ingest"), ("b", "a")))
    path.write_text(f"""name: reuse
work_dir: {root}/work
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
{tagging}
""")
    monkeypatch.setenv(FRESH_WORKERS_ENV, "1" if fresh else "0")
    report = Runner(load_config(path), track=False).run()
    digests = {}
    for stage in ("a", "b"):
        s = report.stage(stage)
        assert s.manifest["parts"] == PARTS
        for f in s.manifest["datasets"]["data"]["files"]:
            file = Path(s.stage_dir) / f["path"]
            assert set(pq.read_table(file).column("tag").to_pylist()) == {stage}  # each stage's own setup, never the other's
            digests[f"{stage}/{f['path'].split('/', 1)[1]}"] = hashlib.sha256(file.read_bytes()).hexdigest()
    setups: dict[str, list[str]] = {"a": [], "b": []}
    for p in trace.iterdir():
        tag, pid, _ = p.name.split("-")
        setups[tag].append(pid)
    return digests, setups


def test_stages_that_share_worker_processes_give_the_outputs_of_separate_processes(ray_local, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(PARTS):
        (data / f"d{i}.jsonl").write_text("".join(json.dumps({"text": f"document {i}.{j}: some words here"}) + "\n" for j in range(5)))

    shared, shared_setups = run_pipeline(tmp_path / "shared", data, fresh=False, max_workers=2, monkeypatch=monkeypatch)
    fresh, fresh_setups = run_pipeline(tmp_path / "fresh", data, fresh=True, max_workers=1, monkeypatch=monkeypatch)

    assert shared == fresh and len(shared) == 2 * PARTS
    # shared: a process set each stage up once (not once per part), and served both stages
    assert all(len(pids) == len(set(pids)) <= 2 for pids in shared_setups.values()), shared_setups
    assert set(shared_setups["a"]) & set(shared_setups["b"]), shared_setups
    # fresh: a process per part, set up once each, none shared between the stages
    assert all(len(set(pids)) == PARTS for pids in fresh_setups.values()), fresh_setups
    assert not set(fresh_setups["a"]) & set(fresh_setups["b"])
