"""End to end on a local Ray: the demo-sized pipeline, MLflow lineage, caching, --stage/--from, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.runner import Runner, StageFailed

SECRET = "do-not-log-this-secret-4242"


def pipeline_yaml(corpus: Path, work: Path, fraction: float = 0.5) -> str:
    return f"""
    name: e2e
    work_dir: {work}
    seed: 7
    mlflow:
      tracking_uri: sqlite:///{work}/mlflow.db
    storage:
      s3:
        secret: ${{LMPIPE_E2E_SECRET}}
    stages:
      ingest:
        uses: ingest
        config:
          sources:
            - {{name: news, paths: ["{corpus}/news/*.jsonl.zst"]}}
            - {{name: python_docs, paths: ["{corpus}/python_docs"], format: text}}
      sample:
        uses: sample
        inputs: [ingest]
        config: {{fraction: {fraction}}}
    """


def digest_files(stage_dir: str, dataset: str = "data") -> dict[str, str]:
    manifest = json.loads((Path(stage_dir) / "_manifest.json").read_text())
    out = {}
    for f in manifest["datasets"][dataset]["files"]:
        name = f["path"].split("/", 1)[1]  # drop the attempt folder: contents must not depend on it
        out[name] = hashlib.sha256((Path(stage_dir) / f["path"]).read_bytes()).hexdigest()
    return out


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("LMPIPE_E2E_SECRET", SECRET)


def test_demo_pipeline_records_lineage_and_caches(ray_local, demo_corpus, pipeline_file, tmp_path, secret_env):
    work = tmp_path / "work"
    loaded = load_config(pipeline_file(pipeline_yaml(demo_corpus, work)))
    first = Runner(loaded).run()

    ingest, sample = first.stage("ingest"), first.stage("sample")
    assert not ingest.cached and not sample.cached
    ic = ingest.manifest["counts"]
    assert ic["rows_in"] == 3824 + 79 and ic["kept"] + sum(ic["quarantined"].values()) == ic["rows_in"]
    assert ic["quarantined"] == {"empty_text": 36}  # real news articles with an empty body
    sc = sample.manifest["counts"]
    assert sc["rows_in"] == ic["kept"]
    assert sc["kept"] + sc["rejected"]["sampled_out"] == sc["rows_in"]
    assert 0.45 < sc["kept"] / sc["rows_in"] < 0.55

    client = MlflowClient(loaded.resolved.tracking_uri())
    parent = client.get_run(first.pipeline_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["lmpipe.kind"] == "pipeline"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["lmpipe.stage"] for c in children) == ["ingest", "sample"]
    run = next(c for c in children if c.data.tags["lmpipe.stage"] == "sample")
    assert run.data.params["config.fraction"] == "0.5"
    assert run.data.tags["lmpipe.fingerprint"] == sample.fingerprint and run.data.tags["lmpipe.cached"] == "false"
    assert run.data.metrics["rows_in"] == sc["rows_in"] and run.data.metrics["rejected.sampled_out"] == sc["rejected"]["sampled_out"]
    datasets = {(d.dataset.name, [t.value for t in d.tags if t.key == "mlflow.data.context"][0]): d.dataset for d in run.inputs.dataset_inputs}
    assert datasets[("ingest.data", "input")].digest == ingest.fingerprint
    assert datasets[("sample.data", "output")].digest == sample.fingerprint
    assert ("sample.rejected", "output") in datasets
    ingest_run = next(c for c in children if c.data.tags["lmpipe.stage"] == "ingest")
    sources = {d.dataset.name: json.loads(d.dataset.source)["uri"] for d in ingest_run.inputs.dataset_inputs}
    assert sources["source:news"] == f"{demo_corpus}/news/*.jsonl.zst"
    assert "manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # the funnel: documents and characters removed per stage and reason, as a table and a chart
    assert {"funnel.csv", "funnel.md", "funnel.png", "pipeline.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    funnel = list(csv.DictReader(open(client.download_artifacts(parent.info.run_id, "funnel.csv", str(tmp_path)))))
    sampled = next(r for r in funnel if r["reason"] == "sampled_out")
    assert int(sampled["docs"]) == sc["rejected"]["sampled_out"] and int(sampled["docs_in"]) == sc["rows_in"]
    assert int(sampled["chars"]) + int(next(r for r in funnel if r["stage"] == "sample" and r["outcome"] == "kept")["chars"]) == int(sampled["chars_in"])

    # secrets never reach MLflow: params, tags and the logged pipeline file keep the ${VAR} reference
    for r in [parent, *children]:
        assert SECRET not in json.dumps(r.data.params) + json.dumps(r.data.tags)
    logged_yaml = client.download_artifacts(parent.info.run_id, "pipeline.yaml", str(tmp_path))
    assert SECRET not in Path(logged_yaml).read_text() and "${LMPIPE_E2E_SECRET}" in Path(logged_yaml).read_text()

    # a second run is fully cached: same outputs, no new attempt, every stage still recorded
    before = {s.name: s.manifest for s in first.stages}
    second = Runner(loaded).run()
    assert [s.cached for s in second.stages] == [True, True]
    assert {s.name: s.manifest for s in second.stages} == before
    children2 = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{second.pipeline_run_id}'")
    assert sorted(c.data.tags["lmpipe.cached"] for c in children2) == ["true", "true"]
    assert all(len(list(Path(s.stage_dir).glob("attempt-*"))) == 1 for s in second.stages)


def test_stage_and_from_rerun_exactly_what_they_should(ray_local, demo_corpus, pipeline_file, tmp_path):
    work = tmp_path / "work"
    base = Runner(load_config(pipeline_file(pipeline_yaml(demo_corpus, work)))).run()
    ingest_manifest = base.stage("ingest").manifest

    # change the sample fraction and rerun only that stage: ingest comes from the cache
    loaded = load_config(pipeline_file(pipeline_yaml(demo_corpus, work, fraction=0.25)))
    only = Runner(loaded).run(only="sample")
    assert [s.name for s in only.stages] == ["ingest", "sample"]
    assert only.stage("ingest").cached and only.stage("ingest").manifest == ingest_manifest
    assert not only.stage("sample").cached and only.stage("sample").fingerprint != base.stage("sample").fingerprint
    kept_quarter = only.stage("sample").manifest["counts"]["kept"]
    assert kept_quarter < base.stage("sample").manifest["counts"]["kept"]

    # --stage on a cached stage recomputes it, and the recomputation is byte-identical
    again = Runner(loaded).run(only="sample")
    assert not again.stage("sample").cached
    assert digest_files(again.stage("sample").stage_dir) == digest_files(only.stage("sample").stage_dir)
    assert len(list(Path(again.stage("sample").stage_dir).glob("attempt-*"))) == 1  # the superseded attempt is gone

    # --from ingest recomputes ingest and everything downstream
    frm = Runner(loaded).run(start_from="ingest")
    assert [s.cached for s in frm.stages] == [False, False]
    assert digest_files(frm.stage("ingest").stage_dir) == digest_files(base.stage("ingest").stage_dir)


def test_same_config_and_input_give_byte_identical_outputs(ray_local, demo_corpus, pipeline_file, tmp_path):
    a = Runner(load_config(pipeline_file(pipeline_yaml(demo_corpus, tmp_path / "a"), "a.yaml"))).run()
    b = Runner(load_config(pipeline_file(pipeline_yaml(demo_corpus, tmp_path / "b"), "b.yaml"))).run()
    for name in ("ingest", "sample"):
        assert a.stage(name).fingerprint == b.stage(name).fingerprint
        for ds in ("data", "rejected", "quarantine"):
            if ds in a.stage(name).manifest["datasets"]:
                assert digest_files(a.stage(name).stage_dir, ds) == digest_files(b.stage(name).stage_dir, ds)


def test_stage_without_committed_upstream_fails_clearly(ray_local, demo_corpus, pipeline_file, tmp_path):
    loaded = load_config(pipeline_file(pipeline_yaml(demo_corpus, tmp_path / "fresh")))
    with pytest.raises(StageFailed, match="upstream stage 'ingest' has no committed output for this config"):
        Runner(loaded).run(only="sample")
