"""A production topology in miniature: a Ray head and a second Ray node (token auth on), data,
work_dir and MLflow artifacts on S3 (moto's server), an ``mlflow server``; ``lmpipe submit``
runs a pipeline there. Then a Ray node is killed in the middle of a data stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import RAY_NODE_GRACE_S, RAY_TRAIN_QUICK_POLL, VENV_BIN, free_port, make_bucket, ray_node_port_args, s3_filesystem, server_process, start_process, stop_process

SECRET = "multinode-secret-never-logged-9f3c"
NEWS_ARTICLES, NEWS_SHARDS = 1200, 8  # enough parts for both nodes and a node killed mid-stage; small enough to be quick


@pytest.fixture(scope="module")
def cluster_env(s3_server, tmp_path_factory):
    """What every node and client of the cluster sees: token auth (a token of its own, so the test
    never depends on a ``~/.ray/auth_token`` left by another Ray), S3 credentials from the environment."""
    import secrets

    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "AWS_ACCESS_KEY_ID": s3_server["key"],
        "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
        "AWS_DEFAULT_REGION": s3_server["region"],
        "LMPIPE_SECRET_UNDER_TEST": SECRET,
        "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint_url"],
        "LMPIPE_PROGRESS": "0",
        **RAY_TRAIN_QUICK_POLL,
    }


@pytest.fixture(scope="module")
def two_nodes(cluster_env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("cluster")
    port, dash = free_port(), free_port()
    head_cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--num-cpus", "1", "--resources", '{"head_node": 1}', "--disable-usage-stats",
        *ray_node_port_args(),
    ]
    worker_cmd = [
        sys.executable, str(Path(__file__).with_name("ray_worker_node.py")), "--address", f"127.0.0.1:{port}", "--num-cpus", "1",
        "--resources", '{"worker_node": 1}', "--disable-usage-stats", *ray_node_port_args(),
    ]
    url = f"http://127.0.0.1:{dash}"
    with server_process(head_cmd, logs / "head.log", f"{url}/api/version", cluster_env, timeout=120, grace_s=RAY_NODE_GRACE_S) as head:
        worker = start_process(worker_cmd, logs / "worker.log", cluster_env)  # on 127.0.0.1 too (ray_worker_node.py)
        try:
            _wait_for_nodes(f"127.0.0.1:{port}", 2, cluster_env)
            yield {"dashboard": url, "gcs": f"127.0.0.1:{port}", "head": head, "worker": worker}
        finally:
            stop_process(worker, RAY_NODE_GRACE_S)


def _wait_for_nodes(gcs: str, n: int, env: dict, timeout: float = 120) -> None:
    code = f"import ray; ray.init(address='{gcs}', log_to_driver=False); print(sum(1 for x in ray.nodes() if x['Alive']))"
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1] == str(n):
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster at {gcs} never had {n} live nodes")


@pytest.fixture(scope="module")
def mlflow_on_s3(cluster_env, s3_server, tmp_path_factory):
    make_bucket(s3_server, "mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", "s3://mlflow/artifacts"]
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, root / "server.log", f"{url}/health", {**cluster_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, timeout=90):
        yield url


@pytest.fixture(scope="module")
def s3_corpus(s3_server, demo_corpus):
    make_bucket(s3_server, "data")
    make_bucket(s3_server, "runs")
    fs = s3_filesystem(s3_server)
    from stages.assets import news_articles

    articles = news_articles()[:NEWS_ARTICLES]
    for i in range(NEWS_SHARDS):  # several small shards: enough parts to spread over both nodes
        body = "".join(json.dumps(a) + "\n" for a in articles[i::NEWS_SHARDS])
        fs.pipe(f"data/news/news-{i:02d}.jsonl", body.encode())
    fs.put(str(demo_corpus / "python_docs"), "data/docs", recursive=True)
    return fs


def pipeline_text(s3: dict, work: str, mlflow_url: str, data_stages_only: bool = False) -> str:
    """The demo pipeline, every stage, at test size: data on S3, outputs and checkpoints on S3."""
    text = f"""
name: multinode
work_dir: {work}
mlflow: {{tracking_uri: "{mlflow_url}", experiment: multinode}}
storage:
  s3:
    endpoint_url: {s3["endpoint_url"]}
    key: ${{AWS_ACCESS_KEY_ID}}
    secret: ${{AWS_SECRET_ACCESS_KEY}}
stages:
  ingest:
    uses: ingest
    config:
      sources:
        - {{name: news, paths: ["s3://data/news/*.jsonl"]}}
        - {{name: docs, paths: ["s3://data/docs"], format: text}}
  language_filter:
    uses: language_filter
    inputs: [ingest]
    config: {{languages: [en]}}
"""
    if data_stages_only:
        return text
    return text + """
  quality_filter: {uses: quality_filter, inputs: [language_filter]}
  toxicity_filter: {uses: toxicity_filter, inputs: [quality_filter]}
  pii_masker: {uses: pii_masker, inputs: [toxicity_filter]}
  exact_dedup: {uses: exact_dedup, inputs: [pii_masker]}
  minhash_dedup: {uses: minhash_dedup, inputs: [exact_dedup]}
  decontaminate:
    uses: decontaminate
    inputs: [minhash_dedup]
    config: {tasks: [mmlu], mode: redact}
  train_tokenizer:
    uses: train_tokenizer
    inputs: [decontaminate]
    config: {vocab_size: 1024, sample_chars: 1000000}
  tokenize:
    uses: tokenize
    inputs: [decontaminate, train_tokenizer]
    config: {seq_len: 64, validation_fraction: 0.02}
  train:
    uses: train
    inputs: [tokenize.train]
    config:
      model: {size: debug, dim: 64, n_layers: 2, n_heads: 4}
      optimizer: {lr: 0.003}
      schedule: {warmup_steps: 2}
      loop: {steps: 12, micro_batch_size: 4, log_every: 4, eval_every: 6}
      checkpoint: {every: 6}
      cluster: {num_workers: 2, resources_per_worker: {CPU: 1}}
  evaluate:
    uses: evaluate
    inputs: [train]
    config:
      checkpoints: all
      tasks: [{name: mmlu, shots: [0], limit: 40}]
      validation_max_sequences: 8
"""


@pytest.fixture(scope="module")
def submitted(two_nodes, mlflow_on_s3, s3_corpus, s3_server, cluster_env, tmp_path_factory):
    """``lmpipe submit`` of the pipeline to the two-node cluster (its outputs are also the
    fault-free reference of the node-failure test)."""
    config = tmp_path_factory.mktemp("submit") / "cluster.yaml"
    config.write_text(pipeline_text(s3_server, "s3://runs/multinode", mlflow_on_s3))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(config), "--address", two_nodes["dashboard"]],
                          capture_output=True, text=True, env=cluster_env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"config": config, "job_id": proc.stdout.split("submitted job ")[1].split()[0]}


def test_submit_to_two_nodes_with_s3_and_mlflow_server(submitted, two_nodes, mlflow_on_s3, s3_corpus, s3_server, cluster_env, tmp_path,
                                                     monkeypatch):
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from pipeline.submit import auth_headers

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", cluster_env["RAY_AUTH_TOKEN_PATH"])

    job_id = submitted["job_id"]

    fs = s3_corpus
    fs.invalidate_cache()
    manifests = {m.split("/")[2]: json.loads(fs.cat(m)) for m in fs.glob("runs/multinode/*/*/_manifest.json")}
    stages = ["ingest", "language_filter", "quality_filter", "toxicity_filter", "pii_masker", "exact_dedup", "minhash_dedup",
              "decontaminate", "train_tokenizer", "tokenize", "train", "evaluate"]
    assert set(manifests) == set(stages)
    assert manifests["ingest"]["counts"]["rows_in"] == NEWS_ARTICLES + 79
    assert len(manifests["ingest"]["parts_per_node"]) == 2, manifests["ingest"]["parts_per_node"]  # both nodes worked
    for m in manifests.values():
        for ds in m["datasets"].values():
            for f in ds["files"]:
                assert fs.exists(f"runs/multinode/{m['stage']}/{m['fingerprint']}/{f['path']}")

    client = MlflowClient(mlflow_on_s3)
    exp = client.get_experiment_by_name("multinode")
    parent = client.search_runs([exp.experiment_id], "tags.`lmpipe.kind` = 'pipeline'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {c.data.tags["lmpipe.stage"]: c for c in children}
    assert set(by_stage) == set(stages) and all(c.info.status == "FINISHED" for c in children)
    assert fs.glob("mlflow/artifacts/**/manifest.json")  # artifacts landed on S3 through the server
    assert {d.dataset.name for d in by_stage["train"].inputs.dataset_inputs} >= {"tokenize.train", "train.data"}
    assert {d.dataset.name for d in by_stage["language_filter"].inputs.dataset_inputs} >= {"ingest.data", "language_filter.rejected"}
    assert len(client.get_metric_history(by_stage["train"].info.run_id, "loss")) >= 3  # per-step metrics from rank 0
    assert any(k.startswith("mmlu") for k in by_stage["evaluate"].data.metrics), by_stage["evaluate"].data.metrics

    # training checkpoints live on S3, and the evaluation read them from there
    train = manifests["train"]
    assert train["summary"]["data"]["final_checkpoint"].startswith("s3://runs/multinode/train/")
    assert fs.glob("runs/multinode/train/**/.metadata"), "no sharded DCP checkpoint on S3"

    # the secret in the cluster's environment appears nowhere: MLflow params, tags, metrics, artifacts, job metadata
    for run in [parent, *children]:
        blob = json.dumps([run.data.params, run.data.tags, run.data.metrics])
        assert SECRET not in blob and s3_server["secret"] not in blob
        for art in client.list_artifacts(run.info.run_id):
            if not art.is_dir:
                text = Path(client.download_artifacts(run.info.run_id, art.path, str(tmp_path))).read_bytes()
                assert SECRET.encode() not in text and s3_server["secret"].encode() not in text
    info = JobSubmissionClient(two_nodes["dashboard"], headers=auth_headers() or None).get_job_info(job_id)
    job_blob = json.dumps([info.metadata, info.runtime_env, info.entrypoint])
    assert SECRET not in job_blob and s3_server["secret"] not in job_blob


def test_node_killed_mid_stage_gives_exact_identical_output(submitted, two_nodes, s3_corpus, s3_server, cluster_env, tmp_path):
    """Kill the second Ray node while the language_filter stage runs: the stage still completes, with the
    same counts and byte-identical files as the fault-free run (the submitted one)."""
    fs = s3_corpus
    env = {**cluster_env}
    run = [sys.executable, "-m", "pipeline.cli", "run", "--address", two_nodes["gcs"]]
    faulty = tmp_path / "faulty.yaml"
    faulty.write_text(pipeline_text(s3_server, "s3://runs/faulty", f"sqlite:///{tmp_path}/faulty.db", data_stages_only=True)
                      .replace("config: {languages: [en]}", "config: {languages: [en]}\n    resources: {max_workers: 2}"))
    driver = subprocess.Popen([*run, str(faulty)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (fs.invalidate_cache() or fs.glob("runs/faulty/language_filter/*/attempt-*/data/*.parquet")):
        assert driver.poll() is None, driver.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(two_nodes["worker"].pid, signal.SIGKILL)  # the whole node: raylet, workers, object store
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-4000:]

    def load(prefix):
        fs.invalidate_cache()  # s3fs caches listings; the polling above listed these folders before the commit
        return {m.split("/")[2]: json.loads(fs.cat(m)) for m in fs.glob(f"runs/{prefix}/*/*/_manifest.json")}

    ref, got = load("multinode"), load("faulty")
    for stage in ("ingest", "language_filter"):
        assert got[stage]["counts"] == ref[stage]["counts"]
        for ds, info in ref[stage]["datasets"].items():
            ref_files = {f["path"].split("/", 1)[1]: fs.cat(f"runs/multinode/{stage}/{ref[stage]['fingerprint']}/{f['path']}") for f in info["files"]}
            got_files = {f["path"].split("/", 1)[1]: fs.cat(f"runs/faulty/{stage}/{got[stage]['fingerprint']}/{f['path']}") for f in got[stage]["datasets"][ds]["files"]}
            assert got_files == ref_files, f"{stage}.{ds} differs after a node failure"
