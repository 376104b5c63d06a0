"""``lmpipe submit`` runs a pipeline as a Ray job on a separately started Ray head (``ray start --head``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import RAY_NODE_GRACE_S, VENV_BIN, free_port, ray_node_port_args, server_process


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1, stopped by its own process group (``ray stop`` would stop every Ray here).
    Started as ``.venv/bin/ray start`` without activating the environment: `python` on its PATH is
    another interpreter, without lmpipe's dependencies (jobs died with ModuleNotFoundError)."""
    port, dash = free_port(), free_port()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if os.path.abspath(p) != str(VENV_BIN))
    env = {**os.environ, "PATH": path, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("VIRTUAL_ENV", None)
    url = f"http://127.0.0.1:{dash}"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2", "--include-dashboard", "true",
           "--disable-usage-stats", *ray_node_port_args()]
    with server_process(cmd, tmp_path_factory.mktemp("ray-head") / "head.log", f"{url}/api/version", env, timeout=120, grace_s=RAY_NODE_GRACE_S):
        yield url


def test_submit_runs_the_pipeline_as_a_ray_job(ray_head, demo_corpus, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(
        f"""
name: submitted
work_dir: ./work
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{demo_corpus}/python_docs"], format: text}}]
  sample:
    uses: sample
    inputs: [ingest]
    config: {{fraction: 0.5}}
"""
    )
    env = {**os.environ, "LMPIPE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(config), "--address", ray_head],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted job" in proc.stdout and "SUCCEEDED" in proc.stdout
    assert "sample           ran" in proc.stdout  # the job's own output, followed live
    work = tmp_path / "work"  # relative paths kept their meaning on the cluster
    manifest = json.loads(next(work.glob("sample/*/_manifest.json")).read_text())
    assert manifest["counts"]["rows_in"] == 79

    # --no-wait returns at once with the job id; the job then runs to completion (fully cached)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(config), "--address", ray_head, "--no-wait"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split("submitted job ")[1].split()[0]
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.submit import auth_headers

    client = JobSubmissionClient(ray_head, headers=auth_headers() or None)
    deadline = time.time() + 180
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline
        time.sleep(1)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)
    assert "cached" in client.get_job_logs(job_id)
    job = [sys.executable, "-m", "pipeline.cli", "job"]
    status = subprocess.run([*job, "status", job_id, "--address", ray_head], capture_output=True, text=True, timeout=60)
    assert status.stdout.startswith(f"{job_id}: SUCCEEDED")
    logs = subprocess.run([*job, "logs", job_id, "--address", ray_head], capture_output=True, text=True, timeout=60)
    assert "sample           cached" in logs.stdout
    stop = subprocess.run([*job, "stop", job_id, "--address", ray_head], capture_output=True, text=True, timeout=60)
    assert stop.stdout.strip() == f"{job_id}: already finished"


def test_submit_with_an_interpreter_that_lacks_lmpipe_says_so_in_one_line(ray_head, tmp_path):
    bare = os.path.join(sys.base_prefix, "bin", "python3")  # this venv's base interpreter: no fsspec, no ray
    config = tmp_path / "job.yaml"
    config.write_text(f"name: bare\nwork_dir: {tmp_path / 'work'}\nstages:\n  ingest:\n    uses: ingest\n"
                      f"    config: {{sources: [{{name: d, paths: ['{tmp_path}/*.jsonl']}}], max_bad_fraction: 1}}\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(config), "--address", ray_head, "--python", bare],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"lmpipe: error: this job would run with {bare} ({bare}), which lacks lmpipe's dependencies" in proc.stdout
    assert "ModuleNotFoundError" not in proc.stdout and "FAILED" in proc.stdout


def test_a_failed_submit_leaves_no_staging_folder(tmp_path, monkeypatch):
    """The folder staged for upload goes whether or not the submit succeeds (nothing listens here)."""
    import tempfile

    from pipeline.submit import submit

    config = tmp_path / "job.yaml"
    config.write_text(f"name: nowhere\nwork_dir: {tmp_path / 'work'}\nstages:\n  ingest:\n    uses: ingest\n"
                      f"    config: {{sources: [{{name: d, paths: ['{tmp_path}/*.jsonl']}}]}}\n")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(Exception):
        submit(str(config), f"http://127.0.0.1:{free_port()}", wait=False)
    assert os.listdir(scratch) == []
