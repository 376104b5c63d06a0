"""The filter stages in a real pipeline on local Ray: ingest -> language -> quality -> toxicity
-> PII on real news plus planted cases. Counts add up at every stage, and changing one
threshold then rerunning only that stage changes exactly the rows the attributes predict."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.runner import Runner
from stages.assets import news_articles

PIPELINE = """
name: filters-test
work_dir: {work}
seed: 3
mlflow: {{tracking_uri: "sqlite:///{work}/mlflow.db"}}
stages:
  ingest:
    uses: ingest
    config:
      sources:
        - name: news
          paths: ["{data}/*.jsonl"]
  language_filter:
    uses: language_filter
    inputs: [ingest]
    config: {{languages: [en]}}
  quality_filter:
    uses: quality_filter
    inputs: [language_filter]
    config:
      gopher_quality: {{min_doc_words: {min_words}}}
  toxicity_filter:
    uses: toxicity_filter
    inputs: [quality_filter]
  pii_masker:
    uses: pii_masker
    inputs: [toxicity_filter]
"""
STAGES = ("language_filter", "quality_filter", "toxicity_filter", "pii_masker")
REPETITION = ("gopher_dup_", "gopher_top_")  # the rules checked before gopher_short_doc


def _corpus(folder: Path) -> int:
    rows = [{"text": a["text"], "url": a["url"] or None} for a in news_articles()[:240] if a["text"].strip()]
    rows += [
        {"text": "Die Bundesregierung hat am Dienstag neue Maßnahmen zur Unterstützung kleiner Unternehmen beschlossen. " * 3},
        {"text": "Le gouvernement a annoncé mardi de nouvelles mesures pour soutenir les petites entreprises du pays. " * 3},
        {"text": "binary\u0000junk " * 10},
        {"text": rows[0]["text"] + " Contact the newsroom at tips@example.com or (555) 123-4567."},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for k, chunk in enumerate((rows[:half], rows[half:])):
        (folder / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    return len(rows)


def _read(report, stage: str, dataset: str) -> pa.Table | None:
    sr = report.stage(stage)
    paths = [Path(sr.stage_dir) / f["path"] for f in sr.manifest["datasets"][dataset]["files"]]
    return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="default") if paths else None


def test_filters_pipeline_counts_and_rerun_one_threshold(ray_local, pipeline_file, tmp_path):
    data = tmp_path / "data"
    n = _corpus(data)
    work = tmp_path / "work"
    report = Runner(load_config(pipeline_file(PIPELINE.format(work=work, data=data, min_words=50), name="a.yaml"))).run()

    previous_kept = n
    for stage in STAGES:
        c = report.stage(stage).manifest["counts"]
        assert c["rows_in"] == previous_kept
        assert c["kept"] + sum(c["rejected"].values()) + sum(c["quarantined"].values()) == c["rows_in"]
        previous_kept = c["kept"]
    lang = report.stage("language_filter").manifest["counts"]
    assert lang["rejected"].get("lang_not_allowed") == 2
    assert lang["quarantined"] == {"nul_bytes": 1}
    quality = report.stage("quality_filter").manifest["counts"]
    assert sum(quality["rejected"].values()) > 0 and quality["kept"] > 0
    masked = _read(report, "pii_masker", "data")
    planted = [t for t in masked.column("text").to_pylist() if "Contact the newsroom" in t]
    if planted:  # unless a quality rule dropped that article
        assert planted[0].endswith("at |||EMAIL_ADDRESS||| or |||PHONE_NUMBER|||.")

    # attributes of every row that reached the quality stage, kept or rejected
    before = {}
    for ds in ("data", "rejected"):
        t = _read(report, "quality_filter", ds)
        if t is not None:
            reasons = t.column("drop_reason").to_pylist() if "drop_reason" in t.column_names else [None] * t.num_rows
            for i, words, r in zip(t.column("id").to_pylist(), t.column("gopher_words").to_pylist(), reasons):
                before[i] = (words, r)
    expected = {
        i: (r if (r and r.startswith(REPETITION)) or words >= 400 else "gopher_short_doc")
        for i, (words, r) in before.items()
    }

    rerun = Runner(load_config(pipeline_file(PIPELINE.format(work=work, data=data, min_words=400), name="b.yaml"))).run(only="quality_filter")
    assert [s.name for s in rerun.stages] == ["ingest", "language_filter", "quality_filter"]
    assert rerun.stage("ingest").cached and rerun.stage("language_filter").cached
    assert not rerun.stage("quality_filter").cached
    after = {}
    for ds in ("data", "rejected"):
        t = _read(rerun, "quality_filter", ds)
        if t is not None:
            reasons = t.column("drop_reason").to_pylist() if "drop_reason" in t.column_names else [None] * t.num_rows
            after.update(zip(t.column("id").to_pylist(), reasons))
    assert after == expected
    changed = sum(1 for i in before if before[i][1] != after[i])
    assert changed > 0
