"""A record above ``max_record_bytes`` is quarantined as ``record_too_large`` (counted, never held
whole), and a long first line costs linear time in every reader that looks at it."""

from __future__ import annotations

import json
import time

from pipeline.storage import Storage
from stages.ingest import SourceConfig, read_json, read_jsonl
from tests.stages.test_ingest_robustness import _balanced, _collect, _run


def test_a_jsonl_line_above_the_limit_is_quarantined_and_its_neighbours_kept(tmp_path):
    big = json.dumps({"text": "y" * 5000}).encode()
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "before"}\n' + big + b'\n{"text": "after"}\n')
    source = SourceConfig(name="w", paths=[str(path)], max_record_bytes=1000)
    good, bad = _collect(read_jsonl(Storage(), str(path), path.name, source, 512))
    assert [g["text"] for g in good] == ["before", "after"]
    assert [(b["line"], b["quarantine_reason"]) for b in bad] == [(2, "record_too_large")]
    assert bad[0]["detail"].startswith(f"{len(big)} bytes, above max_record_bytes=1000 of source 'w'")
    assert bad[0]["raw"] == big[: len(bad[0]["raw"])] and 0 < len(bad[0]["raw"]) <= len(big)


def test_a_long_first_line_of_a_json_file_is_read_in_linear_time(tmp_path):
    # A .json file holding JSON Lines is sniffed (its head) and then streamed through a prefix
    # reader; both re-copied their buffer per 64 KiB chunk (40 MB: ~25 GB copied, tens of seconds).
    text = "z" * 40_000_000
    path = tmp_path / "long.json"
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "second"}) + "\n")
    source = SourceConfig(name="w", paths=[str(path)], max_record_bytes=None)
    started = time.monotonic()
    good, bad = _collect(read_json(Storage(), str(path), path.name, source, 512))
    assert time.monotonic() - started < 15
    assert bad == [] and [len(g["text"]) for g in good] == [len(text), len(["second"][0])]


def test_oversized_records_and_text_files_count_as_quarantined_in_a_run(pipeline_file, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["ok", "x" * 3000, "fine"]) + "\n")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "small.txt").write_text("a short text file\n")
    (tmp_path / "txt" / "huge.txt").write_text("w " * 2000)
    sources = (f'                - {{name: j, paths: ["{tmp_path}/in"], max_record_bytes: 2048}}\n'
               f'                - {{name: t, paths: ["{tmp_path}/txt"], format: text, text_glob: "*.txt", max_record_bytes: 2048}}')
    st, data, quarantine = _run(pipeline_file, tmp_path, sources)
    counts = st.manifest["counts"]
    assert _balanced(counts) and counts["quarantined"] == {"record_too_large": 2}
    assert sorted(r["text"] for r in data) == ["a short text file\n", "fine", "ok"]
    assert sorted((q["file"], q["line"]) for q in quarantine) == [("a.jsonl", 2), ("huge.txt", 0)]
