"""Ingest never loses records silently: folders are read by the formats of the files they hold,
corrupt .zst files are quarantined like truncated gzip, a BOM does not cost the first record,
JSON arrays and nested fields are read, and a source that yields nothing is an error."""

from __future__ import annotations

import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.io import read_table
from pipeline.storage import Storage
from stages.ingest import SourceConfig, doc_id, read_json, read_jsonl, read_parquet
from tests.stages.test_ingest import _run_ingest

BOM = b"\xef\xbb\xbf"


def _collect(tables):
    good, bad = [], []
    for t in tables:
        (bad if "quarantine_reason" in t.column_names else good).extend(t.to_pylist())
    return good, bad


def _run(pipeline_file, tmp_path, sources_yaml: str, extra: str = "", work: str = "work"):
    """The committed ingest output of these sources: its report, data rows and quarantine rows."""
    runner, report = _run_ingest(pipeline_file, tmp_path, sources_yaml, extra, work)
    st = report.stage("ingest")
    data = read_table(runner.storage, runner.storage.glob(f"{st.stage_dir}/attempt-*/data/*.parquet")).to_pylist()
    qfiles = runner.storage.glob(f"{st.stage_dir}/attempt-*/quarantine/*.parquet")
    quarantine = read_table(runner.storage, qfiles).to_pylist() if qfiles else []
    return st, data, quarantine


def _balanced(counts) -> bool:
    return counts["rows_in"] == counts["kept"] + sum(counts["rejected"].values()) + sum(counts["quarantined"].values())


# -- 1. folders ----------------------------------------------------------------------------------

def _mixed_folder(root):
    root.mkdir()
    (root / "sub").mkdir()
    (root / "a.jsonl").write_text(json.dumps({"text": "plain jsonl"}) + "\n")
    (root / "b.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": "gzip jsonl"}) + "\n").encode()))
    (root / "sub" / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress((json.dumps({"text": "zstd jsonl"}) + "\n").encode()))
    (root / "d.json").write_text(json.dumps([{"text": "array one"}, {"text": "array two"}], indent=2))
    pq.write_table(pa.table({"text": ["parquet row"]}), root / "e.parquet")
    (root / "f.txt").write_text("a text file\n")
    (root / "_SUCCESS").write_bytes(b"")  # not a readable file: skipped, not an error
    (root / "notes.csv").write_text("a,b\n")


def test_a_folder_is_read_by_the_formats_of_the_files_it_holds(pipeline_file, tmp_path):
    _mixed_folder(tmp_path / "mixed")
    st, data, quarantine = _run(pipeline_file, tmp_path, f'                - {{name: news, paths: ["{tmp_path}/mixed"]}}')
    assert sorted(r["text"] for r in data) == sorted(
        ["plain jsonl", "gzip jsonl", "zstd jsonl", "array one", "array two", "parquet row", "a text file\n"])
    assert quarantine == []
    counts = st.manifest["counts"]
    assert (counts["rows_in"], counts["kept"]) == (7, 7) and _balanced(counts)
    # ids of the line/row formats are what they always were: source + path under the folder + line/row
    by_origin = {r["origin"]: r["id"] for r in data}
    assert by_origin["a.jsonl:1"] == doc_id("news", "a.jsonl", 1)
    assert by_origin["sub/c.jsonl.zst:1"] == doc_id("news", "sub/c.jsonl.zst", 1)
    assert by_origin["e.parquet:0"] == doc_id("news", "e.parquet", 0)
    assert by_origin["f.txt#0"] == doc_id("news", "f.txt", 0)
    assert by_origin["d.json#1"] == doc_id("news", "d.json", 1)


def test_the_same_folder_gives_byte_identical_outputs(pipeline_file, tmp_path):
    _mixed_folder(tmp_path / "mixed")
    src = f'                - {{name: news, paths: ["{tmp_path}/mixed"]}}'
    runs = []
    for work in ("w1", "w2"):
        st, _, _ = _run(pipeline_file, tmp_path, src, work=work)
        files = sorted((tmp_path / work).glob("ingest/*/attempt-*/*/*.parquet"))
        runs.append([(f.parent.name, f.name, f.read_bytes()) for f in files])
    assert runs[0] and runs[0] == runs[1]


def test_a_folder_with_no_readable_files_is_refused_at_plan_time(pipeline_file, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.csv").write_text("text\nhello\n")
    (tmp_path / "x" / "b.xml").write_text("<doc/>")
    with pytest.raises(ValueError, match=r"^source 'news': folder \S+/x holds no readable files \(found: a\.csv, b\.xml\)"):
        _run(pipeline_file, tmp_path, f'                - {{name: news, paths: ["{tmp_path}/x"]}}')
    assert not list((tmp_path / "work").glob("ingest/*/_manifest.json"))


def test_a_source_that_yields_no_documents_is_an_error_unless_allowed(pipeline_file, tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n\n   \n")
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    sources = (f'                - {{name: good, paths: ["{tmp_path}/good.jsonl"]}}\n'
               f'                - {{name: blank, paths: ["{tmp_path}/blank.jsonl"]{{allow}}}}')
    with pytest.raises(ValueError, match=r"source 'blank' yielded no documents.*allow_empty: true"):
        _run(pipeline_file, tmp_path, sources.replace("{allow}", ""))
    assert not list((tmp_path / "work").glob("ingest/*/_manifest.json"))
    st, data, _ = _run(pipeline_file, tmp_path, sources.replace("{allow}", ", allow_empty: true"))
    assert [r["text"] for r in data] == ["a document"] and st.manifest["counts"]["kept"] == 1


# -- 2. corrupt / truncated zstd -----------------------------------------------------------------

LINES = [json.dumps({"text": f"document number {i} " * 20}).encode() for i in range(3000)]


def _corrupt_zst(path):
    """Two zstd frames; the second one's header is damaged, so the decoder stops with a ZstdError there."""
    c = zstandard.ZstdCompressor()
    second = bytearray(c.compress(b"\n".join(LINES[1000:]) + b"\n"))
    second[:4] = b"\x00\x00\x00\x00"
    path.write_bytes(c.compress(b"\n".join(LINES[:1000]) + b"\n") + bytes(second))


def test_a_corrupt_zst_file_is_quarantined_like_a_truncated_gzip(tmp_path):
    path = tmp_path / "bad.jsonl.zst"
    _corrupt_zst(path)
    good, bad = _collect(read_jsonl(Storage(), str(path), path.name, SourceConfig(name="w", paths=[str(path)]), 512))
    # what was read before the damage is kept, the damage is one unreadable_file record
    assert [g["text"] for g in good] == [json.loads(line)["text"] for line in LINES[:1000]]
    assert [(b["line"], b["quarantine_reason"]) for b in bad] == [(1001, "unreadable_file")]
    assert "ZstdError" in bad[0]["detail"] and "after line 1000" in bad[0]["detail"]
    assert "bytes decompressed" in bad[0]["detail"]


def test_a_truncated_zst_file_is_not_silently_short(tmp_path):
    blob = zstandard.ZstdCompressor().compress(b"\n".join(LINES) + b"\n")
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(blob[: len(blob) // 2])
    good, bad = _collect(read_jsonl(Storage(), str(path), path.name, SourceConfig(name="w", paths=[str(path)]), 512))
    assert 0 < len(good) < len(LINES)
    assert "unreadable_file" in [b["quarantine_reason"] for b in bad]
    assert "truncated" in next(b for b in bad if b["quarantine_reason"] == "unreadable_file")["detail"]


def test_a_corrupt_gzip_is_quarantined_too(tmp_path):
    blob = bytearray(gzip.compress(b"\n".join(LINES) + b"\n"))
    for k in range(12, 16):  # bad deflate data: zlib.error, not an OSError
        blob[k] ^= 0xFF
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(blob))
    good, bad = _collect(read_jsonl(Storage(), str(path), path.name, SourceConfig(name="w", paths=[str(path)]), 512))
    assert good == [] and [(b["line"], b["quarantine_reason"]) for b in bad] == [(1, "unreadable_file")]
    assert bad[0]["detail"].startswith("error: Error -3 while decompressing data") and "after line 0" in bad[0]["detail"]


def test_a_truncated_compressed_json_array_keeps_the_whole_elements(tmp_path):
    texts = [" ".join(hashlib.sha1(f"{i}-{k}".encode()).hexdigest() for k in range(10)) for i in range(3000)]
    blob = zstandard.ZstdCompressor().compress(json.dumps([{"text": t} for t in texts], indent=2).encode())
    path = tmp_path / "cut.json.zst"
    path.write_bytes(blob[: len(blob) // 2])
    good, bad = _collect(read_json(Storage(), str(path), path.name, SourceConfig(name="w", paths=[str(path)]), 64))
    assert 0 < len(good) < 3000 and [g["text"] for g in good] == texts[: len(good)]
    assert [(b["line"], b["quarantine_reason"]) for b in bad] == [(len(good), "unreadable_file")]
    assert "truncated" in bad[0]["detail"] and f"element {len(good)} (line " in bad[0]["detail"]


def test_a_corrupt_zst_in_a_run_keeps_the_rest_and_counts_add_up(pipeline_file, tmp_path):
    (tmp_path / "in").mkdir()
    _corrupt_zst(tmp_path / "in" / "a.jsonl.zst")
    (tmp_path / "in" / "b.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    st, data, quarantine = _run(pipeline_file, tmp_path, f'                - {{name: w, paths: ["{tmp_path}/in/*"]}}')
    counts = st.manifest["counts"]
    assert _balanced(counts) and counts["quarantined"] == {"unreadable_file": 1}
    assert "fine" in {r["text"] for r in data} and counts["kept"] == len(data) == 1001
    assert {q["file"] for q in quarantine if q["quarantine_reason"] == "unreadable_file"} == {"a.jsonl.zst"}


# -- 3a. BOM -------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_a_bom_does_not_cost_the_first_record(tmp_path, suffix):
    payload = BOM + json.dumps({"text": "first"}).encode() + b"\n" + json.dumps({"text": "second"}).encode() + b"\n"
    if suffix.endswith(".gz"):
        payload = gzip.compress(payload)
    elif suffix.endswith(".zst"):
        payload = zstandard.ZstdCompressor().compress(payload)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(payload)
    good, bad = _collect(read_jsonl(Storage(), str(path), path.name, SourceConfig(name="w", paths=[str(path)]), 16))
    assert bad == []
    assert [(g["text"], g["id"]) for g in good] == [("first", doc_id("w", path.name, 1)), ("second", doc_id("w", path.name, 2))]


# -- 3b. JSON arrays -----------------------------------------------------------------------------

def _read_json(path, **source):
    return _collect(read_json(Storage(), str(path), path.name, SourceConfig(name="j", paths=[str(path)], **source), 2))


def test_a_pretty_printed_json_array_is_read_element_by_element(tmp_path):
    records = [{"text": f"element {i}", "url": f"https://e/{i}", "n": i} for i in range(5)] + [{"body": "no text"}, "a string"]
    path = tmp_path / "arr.json"
    path.write_bytes(BOM + json.dumps(records, indent=2, ensure_ascii=False).encode())
    good, bad = _read_json(path)
    assert [g["text"] for g in good] == [f"element {i}" for i in range(5)]
    assert [g["url"] for g in good] == [f"https://e/{i}" for i in range(5)]
    assert [json.loads(g["metadata"]) for g in good] == [{"n": i} for i in range(5)]
    assert [g["id"] for g in good] == [doc_id("j", "arr.json", i) for i in range(5)]
    assert [g["origin"] for g in good] == [f"arr.json#{i}" for i in range(5)]
    assert [(b["line"], b["quarantine_reason"]) for b in bad] == [(5, "missing_text"), (6, "not_an_object")]
    assert json.loads(bad[0]["raw"]) == {"body": "no text"} and bad[0]["detail"] == "element 5 (line 27): no 'text' field"


def test_a_compact_array_an_object_and_json_lines_in_json_files(tmp_path):
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [g["text"] for g in _read_json(compact)[0]] == ["a", "b"]

    one = tmp_path / "one.json"
    one.write_text(json.dumps({"text": "one object", "k": 1}, indent=2))
    good, bad = _read_json(one)
    assert bad == [] and [(g["text"], g["id"], g["origin"]) for g in good] == [("one object", doc_id("j", "one.json", 1), "one.json:1")]

    # .json files that hold JSON Lines are read as before: same ids, line by line
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(1, 4)) + "\nnot json\n")
    good, bad = _read_json(lines)
    assert [(g["text"], g["id"], g["origin"]) for g in good] == [(f"line {i}", doc_id("j", "lines.json", i), f"lines.json:{i}") for i in range(1, 4)]
    assert [(b["line"], b["quarantine_reason"]) for b in bad] == [(4, "invalid_json")]


def test_a_broken_json_array_keeps_the_elements_before_the_damage(tmp_path):
    path = tmp_path / "broken.json"
    text = json.dumps([{"text": f"e{i}"} for i in range(4)], indent=1)
    path.write_text(text.replace('"e2"', '"e2" oops'))
    good, bad = _read_json(path)
    assert [g["text"] for g in good] == ["e0", "e1"]
    assert len(bad) == 1 and bad[0]["quarantine_reason"] == "invalid_json" and bad[0]["line"] == 2
    assert "line 9" in bad[0]["detail"] and bad[0]["raw"].startswith(b'{\n  "text": "e2" oops')


def test_a_json_array_with_invalid_utf8_quarantines_only_that_element(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes(b'[{"text": "ok"}, {"text": "caf\xe9"}, {"text": "also ok"}]')
    good, bad = _read_json(path)
    assert [g["text"] for g in good] == ["ok", "also ok"]
    assert [(b["line"], b["quarantine_reason"], b["raw"]) for b in bad] == [(1, "invalid_utf8", b'{"text": "caf\xe9"}')]


# -- 3c. nested fields ---------------------------------------------------------------------------

NESTED = [
    {"doc": {"text": "nested one", "title": "T1", "links": {"url": "https://n/1"}}, "lang": "en"},
    {"doc": {"text": "nested two", "title": "T2"}, "lang": "de"},
    {"doc": {"title": "no text"}},
    {"doc.text": "a literal dotted key wins", "doc": {"text": "not this one"}},
]


def test_dotted_fields_reach_into_nested_objects_in_jsonl(tmp_path):
    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in NESTED))
    source = SourceConfig(name="n", paths=[str(path)], text_field="doc.text", url_field="doc.links.url")
    good, bad = _collect(read_jsonl(Storage(), str(path), path.name, source, 16))
    assert [g["text"] for g in good] == ["nested one", "nested two", "a literal dotted key wins"]
    assert [g["url"] for g in good] == ["https://n/1", None, None]
    # the text (and a used url) are not repeated in metadata; the rest of the record is
    assert json.loads(good[0]["metadata"]) == {"doc": {"title": "T1"}, "lang": "en"}
    assert json.loads(good[2]["metadata"]) == {"doc": {"text": "not this one"}}
    assert [(b["line"], b["quarantine_reason"]) for b in bad] == [(3, "missing_text")]

    picked = SourceConfig(name="n", paths=[str(path)], text_field="doc.text", metadata_fields=["doc.title", "lang"])
    good, _ = _collect(read_jsonl(Storage(), str(path), path.name, picked, 16))
    assert json.loads(good[0]["metadata"]) == {"doc.title": "T1", "lang": "en"}


def test_dotted_fields_reach_into_parquet_struct_columns(tmp_path):
    path = tmp_path / "nested.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in NESTED[:3]]), path)
    source = SourceConfig(name="p", paths=[str(path)], text_field="doc.text", url_field="doc.links.url")
    good, bad = _collect(read_parquet(Storage(), str(path), path.name, source, 16))
    assert [(g["text"], g["url"], g["id"]) for g in good] == [
        ("nested one", "https://n/1", doc_id("p", "nested.parquet", 0)), ("nested two", None, doc_id("p", "nested.parquet", 1))]
    assert [(b["line"], b["quarantine_reason"]) for b in bad] == [(2, "missing_text")]

    with pytest.raises(KeyError, match=r"no column 'doc\.body'.*doc\.text"):
        list(read_parquet(Storage(), str(path), path.name, SourceConfig(name="p", paths=[str(path)], text_field="doc.body"), 16))


def test_a_nested_text_field_in_a_run(pipeline_file, tmp_path):
    (tmp_path / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in NESTED[:2]))
    st, data, quarantine = _run(pipeline_file, tmp_path, f'                - {{name: n, paths: ["{tmp_path}/n.jsonl"], text_field: doc.text}}')
    assert [r["text"] for r in data] == ["nested one", "nested two"] and quarantine == []


# -- 3d. a wholly quarantined source -------------------------------------------------------------

def test_a_source_whose_every_record_is_quarantined_is_an_error(pipeline_file, tmp_path):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "wrong.jsonl").write_text("".join(json.dumps({"body": f"b{i}"}) + "\n" for i in range(5)) + "not json\n")
    sources = (f'                - {{name: good, paths: ["{tmp_path}/good.jsonl"]}}\n'
               f'                - {{name: wrong, paths: ["{tmp_path}/wrong.jsonl"]{{allow}}}}')
    with pytest.raises(ValueError, match=r"source 'wrong': all 6 records were quarantined \(missing_text: 5, invalid_json: 1\)"):
        _run(pipeline_file, tmp_path, sources.replace("{allow}", ""))
    assert not list((tmp_path / "work").glob("ingest/*/_manifest.json"))
    st, data, quarantine = _run(pipeline_file, tmp_path, sources.replace("{allow}", ", allow_empty: true"))
    assert [r["text"] for r in data] == ["fine"] and len(quarantine) == 6 and _balanced(st.manifest["counts"])
