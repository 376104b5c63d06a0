"""train_classifier + classify: a fastText model trained in the pipeline on real text (news
articles against Shakespeare), deterministic for a seed, held-out metrics, scores and thresholds;
a pinned user model; lineage of what it was trained on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.io import read_table
from pipeline.runner import Runner
from stages.assets import news_articles, shakespeare_texts
from stages.classifier.fasttext_text import fasttext_line, roc_auc


def test_roc_auc_and_line_preparation():
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert roc_auc([0.1, 0.8, 0.3, 0.9], [True, True, False, False]) == 0.25  # 1 of 4 pairs ordered
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5  # a tie counts half
    assert fasttext_line("Line One\n\n  TWO\tthree", 100) == "line one two three"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labelled")
    news = [a for a in news_articles() if len(a["text"]) > 500][:300]
    with open(folder / "news.jsonl", "w") as f:
        for a in news:
            f.write(json.dumps({"text": a["text"], "url": a["url"]}) + "\n")
    chunks = []
    for text in list(shakespeare_texts().values())[:10]:
        chunks += [text[i:i + 2000] for i in range(0, min(len(text), 80_000), 2000)]
    with open(folder / "plays.jsonl", "w") as f:
        for c in chunks[:300]:
            f.write(json.dumps({"text": c}) + "\n")
    return folder


def _pipeline(pipeline_file, tmp_path, corpus, classify: str, name: str = "pipeline.yaml") -> Path:
    return pipeline_file(f"""
        name: classifier-test
        work_dir: {tmp_path}/work
        seed: 7
        mlflow: {{tracking_uri: "sqlite:///{tmp_path}/mlflow.db"}}
        stages:
          ingest:
            uses: ingest
            config:
              sources:
                - {{name: news, paths: ["{corpus}/news.jsonl"]}}
                - {{name: plays, paths: ["{corpus}/plays.jsonl"]}}
          train_classifier:
            uses: train_classifier
            inputs: [ingest]
            config:
              positive: {{source: news}}
              max_per_class: 250
              validation_fraction: 0.2
              fasttext: {{epoch: 10, lr: 0.5}}
          classify:
            uses: classify
            {classify}
        """, name)


def test_trained_in_the_pipeline_scores_and_thresholds(ray_local, pipeline_file, tmp_path, corpus):
    path = _pipeline(pipeline_file, tmp_path, corpus, "inputs: [ingest, train_classifier]\n            config: {name: news, min_score: 0.5}")
    report = Runner(load_config(path)).run()
    train = report.stage("train_classifier").manifest
    summary = train["summary"]["data"]
    assert summary["metrics"]["auc"] > 0.9 and summary["metrics"]["accuracy"] > 0.8  # held out; chance is 0.5
    assert summary["train_rows"]["hq"] + summary["validation_rows"]["hq"] == 250  # max_per_class of 300 news
    model = Path(report.stage("train_classifier").stage_dir) / summary["path"]
    model_bytes = model.read_bytes()
    assert hashlib.sha256(model_bytes).hexdigest() == summary["sha256"]
    labelled = read_table(load_config(path).storage, [f"{report.stage('train_classifier').stage_dir}/{f['path']}"
                                                      for f in train["datasets"]["data"]["files"]])
    assert labelled.num_rows == 500 and set(labelled.column("source").to_pylist()) == {"news", "plays"}  # what it saw

    c = report.stage("classify").manifest["counts"]
    assert c["rows_in"] == 600 and c["rows_in"] == c["kept"] + sum(c["rejected"].values())
    kept = read_table(load_config(path).storage, [f"{report.stage('classify').stage_dir}/{f['path']}"
                                                  for f in report.stage("classify").manifest["datasets"]["data"]["files"]])
    sources = kept.column("source").to_pylist()
    assert sources.count("news") > 240 and sources.count("plays") < 60
    assert min(kept.column("news_score").to_pylist()) >= 0.5

    # deterministic for the seed: a forced retrain gives the same model bytes
    again = Runner(load_config(path)).run(only="train_classifier")
    assert again.stage("train_classifier").manifest["summary"]["data"]["sha256"] == summary["sha256"]

    # the same model as a user's pinned file scores the same; a wrong pin is one line
    pinned = tmp_path / "model.bin"
    pinned.write_bytes(model_bytes)
    sha = summary["sha256"]
    user = f"inputs: [ingest]\n            config: {{name: news, model_path: {pinned}, model_sha256: '{sha}', label: hq}}"
    report2 = Runner(load_config(_pipeline(pipeline_file, tmp_path, corpus, user, "user.yaml"))).run()
    scored = read_table(load_config(path).storage, [f"{report2.stage('classify').stage_dir}/{f['path']}"
                                                    for f in report2.stage("classify").manifest["datasets"]["data"]["files"]])
    assert scored.num_rows == 600
    by_id = dict(zip(scored.column("id").to_pylist(), scored.column("news_score").to_pylist()))
    assert all(by_id[i] == s for i, s in zip(kept.column("id").to_pylist(), kept.column("news_score").to_pylist()))
    wrong = user.replace(sha, "0" * 64)
    with pytest.raises(Exception, match="is not the pinned model_sha256"):
        Runner(load_config(_pipeline(pipeline_file, tmp_path, corpus, wrong, "wrong.yaml"))).run()


def test_reference_texts_from_a_folder_a_text_file_and_jsonl(tmp_path):
    from pipeline.storage import Storage
    from stages.classifier.train import read_reference_texts

    storage = Storage({})
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("First document,\nover two lines.")
    (tmp_path / "docs" / "b.txt").write_text("Second document.")
    (tmp_path / "lines.txt").write_text("one\n\ntwo\n")
    (tmp_path / "refs.jsonl").write_text('{"text": "x y"}\n{"no_text": 1}\n')
    assert [t for _, t in read_reference_texts(storage, str(tmp_path / "docs"))] == ["First document,\nover two lines.", "Second document."]
    assert [t for _, t in read_reference_texts(storage, str(tmp_path / "lines.txt"))] == ["one", "two"]
    with pytest.raises(ValueError, match="refs.jsonl:2: not a JSON object with a text field"):
        list(read_reference_texts(storage, str(tmp_path / "refs.jsonl")))
