"""Ingest from s3:// and write every stage output to s3:// (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json


from pipeline.config import load_config
from pipeline.io import read_table
from pipeline.runner import Runner
from tests.conftest import make_bucket, s3_filesystem


def test_pipeline_reads_and_writes_s3(ray_local, demo_corpus, s3_env, pipeline_file, tmp_path):
    make_bucket(s3_env, "corpus")
    make_bucket(s3_env, "lmpipe")
    fs = s3_filesystem(s3_env)
    for f in sorted((demo_corpus / "news").glob("*.jsonl.zst"))[:2]:
        fs.put(str(f), f"corpus/news/{f.name}")
    fs.put(str(demo_corpus / "python_docs"), "corpus/docs", recursive=True)

    path = pipeline_file(
        f"""
        name: s3-test
        work_dir: s3://lmpipe/runs
        mlflow: {{tracking_uri: "sqlite:///{tmp_path}/mlflow.db"}}
        storage:
          s3:
            endpoint_url: {s3_env["endpoint_url"]}
            key: ${{AWS_ACCESS_KEY_ID}}
            secret: ${{AWS_SECRET_ACCESS_KEY}}
        stages:
          ingest:
            uses: ingest
            config:
              sources:
                - {{name: news, paths: ["s3://corpus/news/*.jsonl.zst"]}}
                - {{name: docs, paths: ["s3://corpus/docs"], format: text}}
          sample:
            uses: sample
            inputs: [ingest]
            config: {{fraction: 0.5}}
        """
    )
    loaded = load_config(path)
    report = Runner(loaded).run()
    ingest, sample = report.stage("ingest"), report.stage("sample")
    assert ingest.stage_dir.startswith("s3://lmpipe/runs/ingest/")
    c = ingest.manifest["counts"]
    assert c["rows_in"] == 1912 + 79 and c["kept"] + sum(c["quarantined"].values()) == c["rows_in"]
    assert fs.exists(ingest.stage_dir.replace("s3://", "") + "/_manifest.json")
    manifest = json.loads(fs.cat(sample.stage_dir.replace("s3://", "") + "/_manifest.json"))
    assert manifest["counts"]["rows_in"] == c["kept"]
    files = [f"{sample.stage_dir}/{f['path']}" for f in manifest["datasets"]["data"]["files"]]
    table = read_table(loaded.storage, files)
    assert table.num_rows == manifest["counts"]["kept"] and set(table.column("source").to_pylist()) == {"news", "docs"}
    sources = {e["name"]: e for e in ingest.manifest["external_inputs"]}
    assert [f["uri"] for f in sources["news"]["files"]] == ["s3://corpus/news/news-0000.jsonl.zst", "s3://corpus/news/news-0001.jsonl.zst"]

    # cached on the second run, straight from the S3 manifests
    again = Runner(loaded).run()
    assert [s.cached for s in again.stages] == [True, True]
