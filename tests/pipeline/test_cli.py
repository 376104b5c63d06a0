"""The CLI as a user runs it: kill the driver mid-stage and resume; lineage; status; stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.local_ray import LOOPBACK_SWITCH

LMPIPE = [sys.executable, "-m", "pipeline.cli"]


def cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMPIPE_PROGRESS": "0"}
    env.pop(LOOPBACK_SWITCH, None)  # as a user runs it: lmpipe itself keeps its Ray on 127.0.0.1
    proc = subprocess.run([*LMPIPE, *args], capture_output=True, text=True, env=env, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"lmpipe {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def split_news(tmp_path_factory) -> Path:
    """The real news articles split into 40 JSONL files, so stages have 40 parts."""
    from stages.assets import news_articles

    out = tmp_path_factory.mktemp("split-news")
    articles = news_articles()
    for i in range(40):
        with open(out / f"news-{i:02d}.jsonl", "w") as f:
            for a in articles[i::40]:
                f.write(json.dumps(a) + "\n")
    return out


def write_config(tmp_path: Path, corpus: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        f"""
name: killtest
work_dir: {tmp_path}/work
ray: {{num_cpus: 2}}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: news, paths: ["{corpus}/*.jsonl"]}}]
  sample:
    uses: sample
    inputs: [ingest]
    config: {{fraction: 0.5}}
    resources: {{max_workers: 1}}
"""
    )
    return path


def test_killed_run_resumes_without_recomputing_committed_stages(split_news, tmp_path):
    config = write_config(tmp_path, split_news)
    work = tmp_path / "work"
    env = {**os.environ, "LMPIPE_PROGRESS": "0"}
    proc = subprocess.Popen([*LMPIPE, "run", str(config)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    try:
        while time.time() < deadline:  # wait until the sample stage has started writing files
            if list(work.glob("sample/*/attempt-*/data/*.parquet")):
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        else:
            pytest.fail("sample stage never started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()

    ingest_manifests = list(work.glob("ingest/*/_manifest.json"))
    assert len(ingest_manifests) == 1
    ingest_before = ingest_manifests[0].read_text()
    assert not list(work.glob("sample/*/_manifest.json")), "a killed stage must not look committed"
    partial = list(work.glob("sample/*/attempt-*"))
    assert partial, "the killed attempt left its partial files (invisible without a manifest)"

    out = cli("run", str(config)).stdout
    assert "ingest           cached" in out and "sample           ran" in out
    assert ingest_manifests[0].read_text() == ingest_before  # not recomputed
    manifest = json.loads(next(work.glob("sample/*/_manifest.json")).read_text())
    c = manifest["counts"]
    assert c["rows_in"] == 3824 - 36 and c["kept"] + c["rejected"]["sampled_out"] == c["rows_in"]
    assert [p.name for p in work.glob("sample/*/attempt-*")] == [manifest["attempt"]]  # the crashed attempt was cleaned
    # the run's own Ray listened on the loopback only (pipeline/local_ray.py), not on the machine's network address
    from mlflow import MlflowClient

    from pipeline.config import load_config

    resolved = load_config(config).resolved
    client = MlflowClient(resolved.tracking_uri())
    finished = client.search_runs([client.get_experiment_by_name(resolved.mlflow.experiment).experiment_id],
                                  "tags.`lmpipe.kind` = 'pipeline' and attributes.status = 'FINISHED'")
    assert [r.data.tags["lmpipe.ray_address"].split(":")[0] for r in finished] == ["127.0.0.1"], [r.data.tags for r in finished]

    # lineage from the output path back to the 40 source files, and from the MLflow run id
    lineage = cli("lineage", str(next(work.glob("sample/*")))).stdout
    assert "sample  (sample v1" in lineage and "<- reads ingest.data" in lineage
    assert "source news" in lineage and "(40 files)" in lineage and "news-00.jsonl" in lineage
    status = cli("status", "--config", str(config)).stdout
    lines = status.splitlines()
    assert "killtest  FINISHED" in lines[0]
    assert "ingest" in lines[1] and "cached" in lines[1] and "sample" in lines[2] and " ran " in lines[2]
    run_id = lines[0].split()[0]
    killed = [line for line in lines if line.startswith(" ") is False and "killtest  KILLED" in line]
    assert len(killed) == 1, status  # the killed driver's run was closed, not left RUNNING forever
    killed_stage = lines[lines.index(killed[0]) + 2]
    assert "sample" in killed_stage and "KILLED" in killed_stage
    by_run = cli("lineage", run_id, "--config", str(config), "--json").stdout
    tree = json.loads(by_run)
    assert tree["stage"] == "sample" and tree["inputs"][0]["stage"] == "ingest"
    assert len(tree["inputs"][0]["sources"][0]["files"]) == 40


def test_config_errors_exit_2_with_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nwork_dir: w\nstages:\n  s:\n    uses: sample\n    inputs: [nope]\n    config: {fraction: 2}\n")
    proc = cli("run", str(bad), check=False)
    assert proc.returncode == 2
    assert "stages.s.config.fraction: Input should be less than or equal to 1" in proc.stderr


def test_stages_lists_registered_stages_with_config_fields():
    out = cli("stages").stdout
    assert "ingest v2  [SourceStage]" in out and "sample v1  [RowStage]" in out
    assert "max_bad_fraction" in out and "fraction: float (required)" in out
