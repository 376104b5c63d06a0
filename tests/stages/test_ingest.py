"""Ingest reads every supported format; bad records are quarantined with file, line and reason."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.config import load_config
from pipeline.io import read_table
from pipeline.runner import Runner
from pipeline.storage import Storage
from stages.ingest import SourceConfig, doc_id, read_jsonl

GOOD_1 = {"text": "The first real document.", "url": "https://example.org/1", "lang": "en"}
GOOD_2 = {"text": "Zweites Dokument mit Umlauten: äöü — and a dash.", "meta": {"k": [1, 2]}}

MIXED_LINES = [
    json.dumps(GOOD_1).encode(),                      # 1 good
    b'{"text": "broken json',                         # 2 invalid_json
    b'{"text": "caf\xe9 latin-1"}',                   # 3 invalid_utf8
    b"",                                              # 4 blank line: not a record
    json.dumps({"text": ""}).encode(),                # 5 empty_text
    json.dumps({"text": "   \n\t"}).encode(),         # 6 empty_text (whitespace)
    json.dumps({"text": 42}).encode(),                # 7 non_string_text
    json.dumps({"body": "no text field"}).encode(),   # 8 missing_text
    json.dumps({"text": None}).encode(),              # 9 missing_text
    json.dumps(["a", "list"]).encode(),               # 10 not_an_object
    b'{"text": "lone \\ud800 surrogate"}',            # 11 invalid_unicode
    json.dumps(GOOD_2, ensure_ascii=False).encode(),  # 12 good
    json.dumps({"text": "crlf line"}).encode() + b"\r",  # 13 good (CRLF file)
]
EXPECTED_BAD = {
    2: "invalid_json", 3: "invalid_utf8", 5: "empty_text", 6: "empty_text", 7: "non_string_text",
    8: "missing_text", 9: "missing_text", 10: "not_an_object", 11: "invalid_unicode",
}


def _collect(tables):
    good, bad = [], []
    for t in tables:
        (bad if "quarantine_reason" in t.column_names else good).extend(t.to_pylist())
    return good, bad


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_mixed_file_exact_quarantine(tmp_path, suffix):
    payload = b"\n".join(MIXED_LINES) + b"\n"
    path = tmp_path / f"mixed{suffix}"
    if suffix.endswith(".gz"):
        payload = gzip.compress(payload)
    elif suffix.endswith(".zst"):
        payload = zstandard.ZstdCompressor().compress(payload)
    path.write_bytes(payload)
    good, bad = _collect(read_jsonl(Storage(), str(path), path.name, SourceConfig(name="web", paths=[str(path)]), batch_rows=3))
    assert {b["line"]: b["quarantine_reason"] for b in bad} == EXPECTED_BAD
    assert [g["text"] for g in good] == [GOOD_1["text"], GOOD_2["text"], "crlf line"]
    assert [g["origin"] for g in good] == [f"{path.name}:1", f"{path.name}:12", f"{path.name}:13"]
    # nothing is lost: every non-blank line is either kept or quarantined, raw bytes preserved
    assert len(good) + len(bad) == len(MIXED_LINES) - 1
    assert next(b for b in bad if b["line"] == 3)["raw"] == b'{"text": "caf\xe9 latin-1"}'
    first = good[0]
    assert first["url"] == "https://example.org/1"
    assert json.loads(first["metadata"]) == {"lang": "en"}
    assert json.loads(good[1]["metadata"]) == {"meta": {"k": [1, 2]}}
    assert first["id"] == doc_id("web", path.name, 1)
    assert len({g["id"] for g in good} | {b["id"] for b in bad}) == len(good) + len(bad)


def test_truncated_gzip_keeps_what_was_read_and_quarantines_the_rest(tmp_path):
    lines = [json.dumps({"text": f"document number {i} " * 20}).encode() for i in range(2000)]
    blob = gzip.compress(b"\n".join(lines))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    good, bad = _collect(read_jsonl(Storage(), str(path), path.name, SourceConfig(name="w", paths=[str(path)]), 512))
    assert 0 < len(good) < 2000
    assert [b["quarantine_reason"] for b in bad] == ["unreadable_file"]
    assert f"after line {len(good)}" in bad[0]["detail"] or f"after line {len(good) + 1}" in bad[0]["detail"]


def _run_ingest(pipeline_file, tmp_path, sources_yaml: str, extra: str = "", work: str = "work"):
    path = pipeline_file(
        f"""
        name: ingest-test
        work_dir: {tmp_path}/{work}
        stages:
          ingest:
            uses: ingest
            config:
              sources:
{sources_yaml}
{extra}
        """
    )
    runner = Runner(load_config(path), use_ray=False, track=False)
    return runner, runner.run()


def test_formats_together_in_process(pipeline_file, tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text(json.dumps({"content": "from jsonl", "link": "u1", "x": 1}) + "\n")
    pq.write_table(pa.table({"text": ["from parquet", None, "second row"], "score": [0.5, 0.1, 0.9]}), tmp_path / "p.parquet")
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    (tmp_path / "txt" / "one.txt").write_text("a plain text file\n\nwith two paragraphs\n")
    (tmp_path / "txt" / "sub" / "two.txt").write_bytes(b"\xff\xfe not utf8")
    (tmp_path / "txt" / "ignored.bin").write_bytes(b"binary")
    sources = f"""
                - {{name: j, paths: ["{tmp_path}/j/*.jsonl"], text_field: content, url_field: link}}
                - {{name: p, paths: ["{tmp_path}/p.parquet"]}}
                - {{name: t, paths: ["{tmp_path}/txt"]}}
"""
    runner, report = _run_ingest(pipeline_file, tmp_path, sources)
    st = report.stage("ingest")
    counts = st.manifest["counts"]
    assert (counts["rows_in"], counts["kept"], counts["rejected"], counts["quarantined"]) == (6, 4, {}, {"invalid_utf8": 1, "missing_text": 1})
    files = [f for f in runner.storage.glob(f"{st.stage_dir}/attempt-*/data/*.parquet")]
    rows = read_table(runner.storage, files).to_pylist()
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    assert by_source["j"][0]["text"] == "from jsonl" and by_source["j"][0]["url"] == "u1"
    assert json.loads(by_source["j"][0]["metadata"]) == {"x": 1}
    assert [r["text"] for r in by_source["p"]] == ["from parquet", "second row"]
    assert [r["origin"] for r in by_source["p"]] == ["p.parquet:0", "p.parquet:2"]
    assert by_source["t"][0]["text"].startswith("a plain text file") and by_source["t"][0]["origin"] == "one.txt#0"


def test_max_bad_fraction_fails_loudly_and_commits_nothing(pipeline_file, tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\nnot json\nnot json either\n')
    with pytest.raises(ValueError, match=r"2 of 3 records \(66.7%\) were quarantined, above max_bad_fraction=0.5 \(invalid_json: 2\)"):
        _run_ingest(pipeline_file, tmp_path, f'                - {{name: b, paths: ["{tmp_path}/bad.jsonl"]}}', "              max_bad_fraction: 0.5")
    assert not list((tmp_path / "work" / "ingest").glob("*/_manifest.json"))


def test_missing_input_names_the_pattern(pipeline_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"source 'b': .*nothing-here\*.jsonl matches no file"):
        _run_ingest(pipeline_file, tmp_path, f'                - {{name: b, paths: ["{tmp_path}/nothing-here*.jsonl"]}}')
