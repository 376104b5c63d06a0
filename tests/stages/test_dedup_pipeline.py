"""The dedup stages inside a real pipeline on local Ray: counts add up, pointers are right,
two runs give byte-identical outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.runner import Runner
from stages.assets import news_articles


def _corpus(folder: Path) -> dict[str, int]:
    """Two JSONL shards: 300 real articles, 20 exact copies (one with different case/punctuation),
    20 near copies (a few words changed), 3 URL duplicates, and bad inputs."""
    arts, seen = [], set()
    for a in news_articles():  # long, distinct texts and URLs, so only the planted copies are duplicates
        key = " ".join(a["text"].lower().split())
        if len(key.split()) >= 150 and key not in seen and a["url"] and a["url"] not in seen:
            seen.update([key, a["url"]])
            arts.append(a)
        if len(arts) == 300:
            break
    rows = [{"text": a["text"], "url": a["url"] or None} for a in arts]
    for i in range(20):
        rows.append({"text": arts[i]["text"].upper().replace(".", " ."), "url": None})
    for i in range(20, 40):
        words = arts[i]["text"].split()
        words[len(words) // 2] = "CHANGED"
        rows.append({"text": " ".join(words) + " extra", "url": None})
    for i in range(40, 43):
        rows.append({"text": "a different body for a known url " + str(i), "url": arts[i]["url"]})
    rows += [{"text": "!!!", "url": None}, {"text": "???", "url": None}, {"text": "tiny doc", "url": None}, {"text": "tiny doc", "url": None}]
    folder.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for k, chunk in enumerate((rows[:half], rows[half:])):
        (folder / f"shard-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    return {"rows": len(rows)}


PIPELINE = """
name: dedup-test
work_dir: {work}
seed: 7
mlflow: {{tracking_uri: "sqlite:///{work}/mlflow.db"}}
stages:
  ingest:
    uses: ingest
    config:
      sources:
        - name: news
          paths: ["{data}/*.jsonl"]
          text_field: text
          url_field: url
  exact_dedup:
    uses: exact_dedup
    inputs: [ingest]
    config: {{urls: true, num_partitions: {parts}}}
  minhash_dedup:
    uses: minhash_dedup
    inputs: [exact_dedup]
    config: {{threshold: 0.8, num_partitions: {parts}}}
"""


def _files(report, stage, dataset):
    m = report.stage(stage).manifest
    base = report.stage(stage).stage_dir
    return [Path(base) / f["path"] for f in m["datasets"][dataset]["files"]]


def _read(paths):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(p) for p in paths]) if paths else None


def test_dedup_pipeline_counts_pointers_and_determinism(ray_local, pipeline_file, tmp_path):
    data = tmp_path / "data"
    n = _corpus(data)["rows"]
    reports = []
    # run b shuffles through 4 partitions (distributed components, verification and keep rule)
    for run, parts in (("a", 1), ("b", 4)):
        path = pipeline_file(PIPELINE.format(work=tmp_path / f"work-{run}", data=data, parts=parts), name=f"p-{run}.yaml")
        reports.append(Runner(load_config(path)).run())
    report = reports[0]
    for stage in ("exact_dedup", "minhash_dedup"):
        c = report.stage(stage).manifest["counts"]
        assert c["kept"] + sum(c["rejected"].values()) == c["rows_in"]
    exact = report.stage("exact_dedup").manifest["counts"]
    assert exact["rows_in"] == n
    # 20 case/punctuation copies + 1 "tiny doc" copy; 3 URL duplicates; "!!!" and "???" are empty after normalization: kept
    assert exact["rejected"] == {"exact_duplicate": 21, "url_duplicate": 3}
    near = report.stage("minhash_dedup").manifest["counts"]
    assert near["rejected"].get("near_duplicate", 0) >= 19

    for stage in ("exact_dedup", "minhash_dedup"):
        kept = _read(_files(report, stage, "data"))
        rejected = _read(_files(report, stage, "rejected"))
        kept_ids = set(kept.column("id").to_pylist())
        assert set(rejected.column("duplicate_of").to_pylist()) <= kept_ids
        assert not kept_ids & set(rejected.column("id").to_pylist())
        assert pc.all(pc.greater_equal(rejected.column("dup_component_size"), 2)).as_py()
    # two runs, 1 and 4 partitions: byte-identical outputs
    assert [r.stage("minhash_dedup").manifest["summary"]["data"]["partitions"] for r in reports] == [1, 4]
    for stage in ("exact_dedup", "minhash_dedup"):
        for ds in ("data", "rejected"):
            a = [hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(reports[0], stage, ds)]
            b = [hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(reports[1], stage, ds)]
            assert a == b and a, (stage, ds)
    m = report.stage("minhash_dedup").manifest
    assert m["metrics"]["lsh.bands"] == 16 and m["metrics"]["lsh.rows"] == 8  # weights (0.05, 0.95)
    assert m["summary"]["data"]["verified_edges"] <= m["summary"]["data"]["edges"]
    assert "dedup.rate.news" in m["metrics"]
