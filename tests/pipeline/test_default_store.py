"""Where a run's lineage goes when the pipeline file does not say, and a missing bucket named.

With an ``s3://`` work dir the default MLflow store was ``$PWD/.lmpipe``: ``lmpipe status`` from
another folder saw other runs, or none. It is one place now ($LMPIPE_HOME, else ~/.lmpipe), said
when a run starts; S3 said "The specified bucket does not exist" without naming the bucket."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import load_config
from pipeline.runner import Runner
from tests.conftest import make_bucket

BODY = """
name: where
work_dir: {work}
storage: {{s3: {{endpoint_url: "{endpoint}", key: "${{AWS_ACCESS_KEY_ID}}", secret: "${{AWS_SECRET_ACCESS_KEY}}"}}}}
stages:
  ingest:
    uses: ingest
    config: {{sources: [{{name: s, paths: ["{source}"]}}]}}
"""


def _file(tmp_path, work, source="/nowhere/*.jsonl", endpoint="http://127.0.0.1:9"):
    path = tmp_path / f"p{len(list(tmp_path.glob('p*.yaml')))}.yaml"
    path.write_text(BODY.format(work=work, source=source, endpoint=endpoint))
    return path


def test_the_default_store_of_a_remote_work_dir_is_one_place_whatever_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    path = _file(tmp_path, "s3://bucket/w")
    seen = set()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        resolved = load_config(path).resolved
        seen.add((resolved.tracking_uri(), resolved.artifact_location()))
    assert seen == {(f"sqlite:///{tmp_path}/home/mlflow.db", (tmp_path / "home" / "mlartifacts").as_uri())}
    assert load_config(path).resolved.describe_tracking().startswith(
        f"MLflow store: sqlite:///{tmp_path}/home/mlflow.db (the default for a remote work_dir: $LMPIPE_HOME, else ~/.lmpipe")


def test_a_run_says_where_its_lineage_goes_and_names_a_missing_bucket(s3_env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LMPIPE_HOME", str(tmp_path / "home"))
    make_bucket(s3_env, "where-data")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a document"}) + "\n")
    path = _file(tmp_path, "s3://no-such-bucket/w", str(data), s3_env["endpoint_url"])
    with caplog.at_level(logging.INFO, logger="lmpipe"), pytest.raises(FileNotFoundError) as e:
        Runner(load_config(path), use_ray=False)
    assert f"MLflow store: sqlite:///{tmp_path}/home/mlflow.db (the default" in caplog.text
    assert str(e.value) == (f"work_dir s3://no-such-bucket/w: the bucket 'no-such-bucket' does not exist at"
                            f" {s3_env['endpoint_url']}; create it or fix work_dir")

    source = _file(tmp_path, "s3://where-data/w", "s3://no-such-source/docs/*.jsonl", s3_env["endpoint_url"])
    with pytest.raises(FileNotFoundError, match=r"^source 's': s3://no-such-source/docs/\*.jsonl: the bucket 'no-such-source' does not exist$"):
        Runner(load_config(source), use_ray=False, track=False).run()
