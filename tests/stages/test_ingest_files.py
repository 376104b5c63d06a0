"""Ingest and the files it is given: symlinked folders, damaged Parquet."""

from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Storage
from stages.ingest import SourceConfig, read_parquet
from stages.ingest.listing import folder_files
from tests.stages.test_ingest_robustness import _balanced, _collect, _run


# -- symlinked subfolders ----------------------------------------------------------------------

def _linked_folder(tmp_path):
    """src/top.txt, src/linked -> ../real (real/sub/a.txt, real/b.jsonl), and a loop real/back -> ../src."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "sub" / "a.txt").write_text("a text file behind a link\n")
    (tmp_path / "real" / "b.jsonl").write_text(json.dumps({"text": "a jsonl line behind a link"}) + "\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "top.txt").write_text("the top file\n")
    os.symlink("../real", tmp_path / "src" / "linked")
    os.symlink("../src", tmp_path / "real" / "back")
    os.symlink("nowhere", tmp_path / "src" / "dangling.txt")
    return tmp_path / "src"


def test_a_symlinked_subfolder_is_followed_and_a_loop_is_not(tmp_path):
    src = _linked_folder(tmp_path)
    files, skipped = folder_files(Storage(), str(src))
    assert [os.path.relpath(f, src) for f in files] == ["linked/b.jsonl", "linked/sub/a.txt", "top.txt"]
    reasons = {os.path.relpath(p, src): r for p, r in skipped}
    assert set(reasons) == {"linked/back", "dangling.txt"}
    assert "(a loop)" in reasons["linked/back"] and "broken symlink" in reasons["dangling.txt"]


def test_a_symlinked_subfolder_is_read_under_format_text(pipeline_file, tmp_path, caplog):
    src = _linked_folder(tmp_path)
    (tmp_path / "real" / "b.jsonl").unlink()  # format: text reads every file as one document
    with caplog.at_level(logging.WARNING, logger="lmpipe"):
        st, data, quarantine = _run(pipeline_file, tmp_path, f'                - {{name: t, paths: ["{src}"], format: text}}')
    assert sorted(r["origin"] for r in data) == ["linked/sub/a.txt#0", "top.txt#0"]
    assert quarantine == [] and _balanced(st.manifest["counts"])
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "(a loop)" in warned and "broken symlink" in warned


def test_a_symlinked_subfolder_is_read_by_format_under_auto(pipeline_file, tmp_path, caplog):
    src = _linked_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lmpipe"):
        st, data, _ = _run(pipeline_file, tmp_path, f'                - {{name: a, paths: ["{src}"]}}')
    assert sorted(r["origin"] for r in data) == ["linked/b.jsonl:1", "linked/sub/a.txt#0", "top.txt#0"]
    assert "no known format" not in " ".join(r.getMessage() for r in caplog.records)


# -- damaged Parquet ---------------------------------------------------------------------------

def _damaged_parquet(path, rows: int = 3000):
    pq.write_table(pa.table({"text": [f"row {i} " * 8 for i in range(rows)]}), path, row_group_size=1000, compression="none")
    blob = bytearray(path.read_bytes())
    return blob


def test_a_parquet_file_with_a_bad_footer_is_quarantined(tmp_path):
    path = tmp_path / "bad.parquet"
    blob = _damaged_parquet(path)
    path.write_bytes(bytes(blob[: len(blob) // 2]))  # truncated: no footer
    good, bad = _collect(read_parquet(Storage(), str(path), path.name, SourceConfig(name="p", paths=[str(path)]), 64))
    assert good == [] and [(b["line"], b["quarantine_reason"]) for b in bad] == [(0, "unreadable_file")]
    assert "not a readable Parquet file" in bad[0]["detail"]


def test_a_parquet_file_with_a_damaged_page_keeps_the_rows_before_it(tmp_path):
    path = tmp_path / "bad.parquet"
    blob = _damaged_parquet(path)
    second = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = second.data_page_offset
    blob[start:start + 64] = b"\xff" * 64  # the second row group's page header
    path.write_bytes(bytes(blob))
    good, bad = _collect(read_parquet(Storage(), str(path), path.name, SourceConfig(name="p", paths=[str(path)]), 1000))
    assert [g["text"] for g in good] == [f"row {i} " * 8 for i in range(1000)]
    assert [(b["line"], b["quarantine_reason"]) for b in bad] == [(1000, "unreadable_file")]


def test_a_corrupt_parquet_file_in_a_run_is_quarantined_like_a_corrupt_zst(pipeline_file, tmp_path):
    (tmp_path / "in").mkdir()
    blob = _damaged_parquet(tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "a.parquet").write_bytes(bytes(blob[:100]))
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    st, data, quarantine = _run(pipeline_file, tmp_path, f'                - {{name: w, paths: ["{tmp_path}/in/*"]}}')
    counts = st.manifest["counts"]
    assert _balanced(counts) and counts["quarantined"] == {"unreadable_file": 1} and counts["kept"] == 1
    assert [q["file"] for q in quarantine] == ["a.parquet"]
