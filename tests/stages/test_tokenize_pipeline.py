"""ingest -> decontaminate -> train_tokenizer -> tokenize on local Ray, on a small real sample:
counts add up across stages, the manifest carries what training needs, MLflow has the reports,
and the tokenizer and shards are byte-identical whether 2 workers or 1 made them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

from pipeline.config import load_config
from pipeline.io import read_table
from pipeline.runner import Runner
from pipeline.storage import Storage
from stages.assets import news_articles, python_doc_topics
from stages.evalsets import load_mmlu

PIPELINE = """
name: tokenize-test
work_dir: {work}
seed: 11
mlflow: {{tracking_uri: "sqlite:///{work}/mlflow.db"}}
stages:
  ingest:
    uses: ingest
    config:
      sources:
        - name: news
          paths: ["{data}/news/*.jsonl"]
        - name: docs
          paths: ["{data}/docs"]
          format: text
  decontaminate:
    uses: decontaminate
    inputs: [ingest]
    config: {{tasks: [mmlu], mode: redact}}
  decontaminate_paragraphs:  # Dolma's rule, beside the GPT-3 one: the planted questions are whole lines
    uses: decontaminate
    inputs: [ingest]
    config: {{tasks: [mmlu], match: paragraph}}
  train_tokenizer:
    uses: train_tokenizer
    inputs: [decontaminate]
    config: {{vocab_size: 2048, sample_chars: 400000}}
    resources: {{max_workers: {workers}}}
  tokenize:
    uses: tokenize
    inputs: [decontaminate, train_tokenizer]
    config: {{seq_len: 256, validation_fraction: 0.1, shard_sequences: 64, mixture: {{news: 0.7, docs: 0.3}}}}
    resources: {{max_workers: {workers}}}
"""


def _digests(report) -> dict[str, str]:
    out = {}
    for name in ("train_tokenizer", "tokenize"):
        st = report.stage(name)
        for ds, info in st.manifest["datasets"].items():
            for f in info["files"]:
                out[f"{name}/{ds}/{f['path'].split('/', 1)[1]}"] = hashlib.sha256((Path(st.stage_dir) / f["path"]).read_bytes()).hexdigest()
    out["tokenizer.json"] = report.stage("train_tokenizer").manifest["summary"]["data"]["sha256"]
    return out


def _corpus(folder: Path) -> dict:
    arts = [a for a in news_articles() if len(a["text"]) > 500][:160]
    mmlu = [e for e in load_mmlu().examples if len(e.context.split()) >= 25 and e.metadata["subject"] != "moral scenarios"][::500][:2]
    rows = [{"text": a["text"], "url": a["url"]} for a in arts]
    # two contaminated documents: an MMLU question pasted into a real article, twice (kept, redacted)
    for k, ex in enumerate(mmlu[:2]):
        t = arts[k + 100]["text"]
        rows.append({"text": t[: len(t) // 2] + "\n" + ex.context + "\n" + t[len(t) // 2 :], "url": None})
    (folder / "news").mkdir(parents=True)
    for k in range(2):
        (folder / "news" / f"n{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k::2]))
    (folder / "docs").mkdir()
    topics = list(python_doc_topics().items())[:60]
    for name, text in topics:
        (folder / "docs" / f"{name}.txt").write_text(text)
    return {"docs": len(rows) + len(topics), "planted": [e.id for e in mmlu[:2]]}


def test_pipeline_end_to_end(ray_local, pipeline_file, tmp_path):
    import mlflow
    from tokenizers import Tokenizer

    info = _corpus(tmp_path / "data")
    path = pipeline_file(PIPELINE.format(work=tmp_path / "work", data=tmp_path / "data", workers=2))
    report = Runner(load_config(str(path))).run()
    two_workers = _digests(report)

    ingest = report.stage("ingest").manifest
    dec = report.stage("decontaminate").manifest
    assert ingest["counts"]["kept"] == info["docs"]
    c = dec["counts"]
    assert c["rows_in"] == info["docs"] == c["kept"] + sum(c["rejected"].values())
    mm = dec["summary"]["data"]["tasks"]["mmlu"]
    assert mm["docs"] == 2 and mm["docs_redacted"] == 2 and mm["examples_found"] >= 2
    dec_stage = report.stage("decontaminate")
    rows = read_table(Storage(), [str(Path(dec_stage.stage_dir) / f["path"]) for f in dec["datasets"]["data"]["files"]]).to_pylist()
    flagged = [r for r in rows if r["contaminated_examples"]]
    assert len(flagged) == 2 and all(r["redacted_chars"] > 0 for r in flagged)
    assert {f"mmlu:{i}" for i in info["planted"]} <= {e for r in flagged for e in r["contaminated_examples"]}
    para = report.stage("decontaminate_paragraphs").manifest
    assert para["counts"]["rejected"] == {"contaminated": 2} and para["counts"]["kept"] == info["docs"] - 2
    assert para["summary"]["data"]["tasks"]["mmlu"]["examples_found"] == 2

    tok = report.stage("tokenize")
    m = tok.manifest
    t = m["summary"]["data"]
    assert t["dtype"] == "uint16" and t["seq_len"] == 256 and t["vocab_size"] == 2048
    assert {t["bos_id"], t["eos_id"], t["pad_id"]} == {0, 1, 2}
    # every kept document is in exactly one split
    docs_by_split = {s: sum(v.values()) for s, v in t["documents"].items()}
    assert sum(docs_by_split.values()) == c["kept"]
    # the stage's counts are documents (the funnel), not sequences
    assert m["counts"]["rows_in"] == c["kept"] and m["counts"]["kept"] + sum(m["counts"]["rejected"].values()) == c["kept"]
    assert set(t["documents"]["validation"]) == {"news", "docs"}  # held out per source
    shares = t["mixture"]["achieved_shares"]
    assert abs(shares["news"] - 0.7) < 0.05 and abs(shares["docs"] - 0.3) < 0.05
    train_files = [Path(tok.stage_dir) / f["path"] for f in m["datasets"]["train"]["files"]]
    assert train_files and all(f.suffix == ".arrow" for f in train_files)
    table = read_table(Storage(), [str(f) for f in train_files])
    assert table.num_rows == m["datasets"]["train"]["rows"] == t["sequences"]["train"]
    assert table.schema.field("tokens").type == pa.list_(pa.uint16(), 257)
    tokenizer = Tokenizer.from_file(str(Path(tok.stage_dir) / t["tokenizer_path"]))
    assert tokenizer.get_vocab_size() == 2048

    # MLflow: tokenizer and contamination report are artifacts of their stage runs
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/work/mlflow.db")
    names = {a.path for s in ("decontaminate", "train_tokenizer") for a in client.list_artifacts(report.stage(s).run_id)}
    assert {"contamination_report.json", "tokenizer.json"} <= names

    # the tokenizer and the shards again on one worker: the same bytes
    one = pipeline_file(PIPELINE.format(work=tmp_path / "work", data=tmp_path / "data", workers=1), "one.yaml")
    again = Runner(load_config(str(one))).run(start_from="train_tokenizer")
    assert not again.stage("tokenize").cached and _digests(again) == two_workers
