"""Lineage recorded in a real ``mlflow server`` process over HTTP, artifacts proxied by the server."""

from __future__ import annotations

import os

import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.runner import Runner
from tests.conftest import VENV_BIN, free_port, server_process


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, root / "server.log", f"{url}/health", env, timeout=90):
        yield url, root


def test_pipeline_lineage_in_mlflow_server(ray_local, demo_corpus, mlflow_server, pipeline_file, tmp_path):
    url, root = mlflow_server
    path = pipeline_file(
        f"""
        name: server-test
        work_dir: {tmp_path}/work
        mlflow: {{tracking_uri: "{url}", experiment: lmpipe-server}}
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
    report = Runner(load_config(path)).run()
    client = MlflowClient(url)
    parent = client.get_run(report.pipeline_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {c.data.tags["lmpipe.stage"]: c for c in children}
    assert set(by_stage) == {"ingest", "sample"}
    assert by_stage["ingest"].data.metrics["rows_in"] == 79
    names = {d.dataset.name for d in by_stage["sample"].inputs.dataset_inputs}
    assert {"ingest.data", "sample.data", "sample.rejected"} <= names
    # artifacts went through the server into its artifact store
    assert [a.path for a in client.list_artifacts(by_stage["sample"].info.run_id)] == ["manifest.json"]
    assert list((root / "artifacts").rglob("manifest.json"))
