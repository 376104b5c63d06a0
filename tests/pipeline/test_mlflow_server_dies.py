"""A tracking server that dies mid-run: the run goes on without recording (one warning naming the
server) in bounded time, every stage commits -- the next ones included -- and running the same
command when the server is back records them all (every stage is then cached). It waited 12 minutes
on MLflow's retries, then failed, and the next stage never ran."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

from mlflow import MlflowClient

from pipeline import manifest as mf
from pipeline.config import load_config
from pipeline.runner import Runner
from tests.conftest import VENV_BIN, free_port, server_process

BODY = """
name: server-dies
work_dir: {work}
mlflow: {{tracking_uri: "{url}", experiment: dies}}
stages:
  ingest:
    uses: ingest
    config: {{sources: [{{name: s, paths: ["{data}"]}}]}}
  sample:
    uses: sample
    inputs: [ingest]
    config: {{fraction: 1.0}}
  tail:
    uses: sample
    inputs: [sample]
    config: {{fraction: 1.0}}
"""


def _mlflow_server(root, port):
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return server_process(cmd, root / "server.log", f"http://127.0.0.1:{port}/health", env, timeout=120)


def test_a_tracking_server_killed_mid_run(tmp_path, caplog):
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    path = tmp_path / "p.yaml"
    path.write_text(BODY.format(work=tmp_path / "work", url=url, data=data))

    with _mlflow_server(root, port) as server:
        runner = Runner(load_config(path), use_ray=False)
        compute = runner._compute

        def killing_the_server_during_sample(node, *args, **kwargs):
            if node.name == "sample":
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            return compute(node, *args, **kwargs)

        runner._compute = killing_the_server_during_sample
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="lmpipe"):
            report = runner.run()
        took = time.monotonic() - started

    assert took < 90  # refused connections: three tries of each request, then a 5 s health check
    assert [s.name for s in report.stages] == ["ingest", "sample", "tail"]  # the stages after it ran
    assert all(mf.load_manifest(runner.storage, s.stage_dir) == s.manifest for s in report.stages)  # committed
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "tracking server" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"the MLflow tracking server at {url} stopped answering (")
    assert "run the same command again when the server is back to record them" in warnings[0]

    with _mlflow_server(root, port):  # the server is back: the same command records every stage
        again = Runner(load_config(path), use_ray=False).run()
        assert [s.cached for s in again.stages] == [True, True, True]
        client = MlflowClient(url)
        parent = client.get_run(again.pipeline_run_id)
        assert parent.info.status == "FINISHED"
        children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert {c.data.tags["lmpipe.stage"]: c.data.tags["lmpipe.output_uri"] for c in children} == \
            {s.name: s.stage_dir for s in report.stages}
