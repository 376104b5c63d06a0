"""Parts bounded by size: a corpus in one big file is read as several parts of at most
``max_part_bytes`` (JSONL by byte ranges cut at line boundaries, Parquet by row groups, a compressed
stream as one task whose output files roll over), with exactly the rows an unsplit read gives, and
the same bytes whatever the number of workers."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.config import load_config
from pipeline.io import read_table, string_bytes_per_row
from pipeline.runner import Runner
from pipeline.storage import Storage
from stages.assets import news_articles
from stages.ingest import SourceConfig, read_jsonl
from stages.ingest.planning import LineRange, line_spans, range_starts

BOUND = 32 << 10


def _lines(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.05:
            out.append(b"")  # a blank line: not a record, but it has a number
        elif kind < 0.08:
            out.append(b"not json")
        else:
            words = " ".join(f"w{rng.randrange(10_000)}" for _ in range(rng.randrange(1, 400)))
            out.append(json.dumps({"text": f"doc {i}: {words}", "k": i}).encode() + (b"\r" if kind < 0.1 else b""))
    return out


def _rows(tables) -> list[dict]:
    return [r for t in tables for r in t.to_pylist()]


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_line_spans_read_every_line_once_with_its_number(tmp_path, trailing_newline):
    lines = _lines(600)
    lines[300] = json.dumps({"text": "x" * (3 * BOUND)}).encode()  # one line longer than several ranges
    path = tmp_path / "one.jsonl"
    path.write_bytes(b"\n".join(lines) + (b"\n" if trailing_newline else b""))
    storage, source = Storage(), SourceConfig(name="s", paths=[str(path)])
    whole = _rows(read_jsonl(storage, str(path), path.name, source, 64))
    spans = line_spans(storage, str(path), path.stat().st_size, BOUND)
    assert len(spans) == len(range_starts(path.stat().st_size, BOUND)) > 5
    pieces = [_rows(read_jsonl(storage, str(path), path.name, source, 64, span=s)) for s in spans]
    assert any(p == [] for p in pieces)  # a range inside the long line holds no line start
    key = lambda r: (r.get("origin") or f"{r['file']}:{r['line']}", r.get("quarantine_reason") or "")  # noqa: E731
    assert sorted((r for p in pieces for r in p), key=key) == sorted(whole, key=key)


def test_a_range_starting_exactly_at_a_line_start(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"ab\ncd\nef\n")
    spans = line_spans(Storage(), str(path), 9, 3)
    assert [(s.start, s.end, s.first_line) for s in spans] == [(0, 3, 1), (3, 6, 2), (6, 9, 3)]
    with open(path, "rb") as f:
        assert [LineRange(f, s.start, s.end).read() for s in spans] == [b"ab\n", b"cd\n", b"ef\n"]


# -- in a run ----------------------------------------------------------------------------------

PIPELINE = """
name: parts
work_dir: {work}
seed: 3
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: news, paths: ["{data}"]}}]
{bound}
    resources: {{max_workers: {workers}}}
  language:
    uses: language_filter
    inputs: [ingest]
    config: {{languages: [en]}}
    resources: {{max_workers: {workers}}}
  exact:
    uses: exact_dedup
    inputs: [language]
    resources: {{max_workers: {workers}}}
"""


@pytest.fixture(scope="module")
def one_file(tmp_path_factory) -> dict[str, Path]:
    """The same ~300 news articles as one JSONL, one Parquet (small row groups) and one .jsonl.zst."""
    folder = tmp_path_factory.mktemp("one-file")
    arts = [{"text": a["text"], "url": a["url"]} for a in news_articles()[:300]]
    arts.append(arts[5])  # an exact duplicate for the dedup stage
    data = "".join(json.dumps(a) + "\n" for a in arts).encode()
    (folder / "corpus.jsonl").write_bytes(data)
    (folder / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"text": [a["text"] for a in arts], "url": [a["url"] for a in arts]}), folder / "corpus.parquet",
                   row_group_size=20)
    return {"jsonl": folder / "corpus.jsonl", "zst": folder / "corpus.jsonl.zst", "parquet": folder / "corpus.parquet"}


def _run(tmp_path: Path, data: Path, work: str, bound: int | None, workers: int = 1, use_ray: bool = False, stage: str = "ingest"):
    text = PIPELINE.format(work=tmp_path / work, data=data, workers=workers,
                           bound="" if bound is None else f"      max_part_bytes: {bound}")
    (tmp_path / f"{work}.yaml").write_text(text)
    runner = Runner(load_config(tmp_path / f"{work}.yaml"), use_ray=use_ray, track=False)
    return runner, runner.run(only=None if stage == "all" else stage)


def _data(runner, st, dataset: str = "data") -> list[dict]:
    files = [f"{st.stage_dir}/{f['path']}" for f in st.manifest["datasets"].get(dataset, {"files": []})["files"]]
    return read_table(runner.storage, files).to_pylist() if files else []


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_one_file_corpus_above_the_bound_gets_several_parts_and_the_same_rows(tmp_path, one_file, kind):
    runner, whole = _run(tmp_path, one_file[kind], "whole", None)
    _, split = _run(tmp_path, one_file[kind], "split", BOUND)
    w, s = whole.stage("ingest"), split.stage("ingest")
    assert w.manifest["parts"] == 1
    size = one_file[kind].stat().st_size
    assert s.manifest["parts"] >= (size // BOUND if kind == "jsonl" else 2)
    assert _data(runner, s) == _data(runner, w)  # same rows, ids and origins, in the same order
    assert s.manifest["counts"] == w.manifest["counts"]
    assert s.manifest["counters"] == w.manifest["counters"]  # one file, counted once
    assert s.manifest["bytes_in"] == w.manifest["bytes_in"] == size
    for f in s.manifest["datasets"]["data"]["files"]:  # every output file is within the bound
        assert string_bytes_per_row(pq.read_table(Path(s.stage_dir) / f["path"])).sum() <= BOUND


def test_a_compressed_file_is_one_task_whose_output_files_roll_over(tmp_path, one_file):
    runner, whole = _run(tmp_path, one_file["zst"], "whole", None)
    _, split = _run(tmp_path, one_file["zst"], "split", BOUND)
    w, s = whole.stage("ingest"), split.stage("ingest")
    assert w.manifest["parts"] == s.manifest["parts"] == 1
    files = s.manifest["datasets"]["data"]["files"]
    assert len(files) >= one_file["jsonl"].stat().st_size // BOUND // 2
    assert [f["path"].rsplit("/", 1)[1] for f in files] == [f"part-00000-{i:04d}.parquet" for i in range(len(files))]
    sizes = [string_bytes_per_row(pq.read_table(Path(s.stage_dir) / f["path"])) for f in files]
    assert all(x.sum() <= BOUND or len(x) == 1 for x in sizes)
    assert _data(runner, s) == _data(runner, w)


def _digests(report, stages) -> dict[str, str]:
    out = {}
    for name in stages:
        st = report.stage(name)
        for ds, info in st.manifest["datasets"].items():
            for f in info["files"]:
                out[f"{name}/{ds}/{f['path'].split('/', 1)[1]}"] = hashlib.sha256((Path(st.stage_dir) / f["path"]).read_bytes()).hexdigest()
    return out


def test_split_parts_give_the_same_bytes_with_one_and_two_workers(tmp_path, one_file, ray_local):
    bound = 4 * BOUND  # a few parts: each costs a task in every stage
    _, one = _run(tmp_path, one_file["jsonl"], "w1", bound, workers=1, use_ray=True, stage="all")
    _, two = _run(tmp_path, one_file["jsonl"], "w2", bound, workers=2, use_ray=True, stage="all")
    assert one.stage("ingest").manifest["parts"] >= 4
    assert one.stage("language").manifest["parts"] >= one.stage("ingest").manifest["parts"]  # kept bounded downstream
    a, b = _digests(one, ["ingest", "language", "exact"]), _digests(two, ["ingest", "language", "exact"])
    assert a == b and len(a) >= 12
    assert one.stage("exact").manifest["counts"]["rejected"]  # the duplicate is found across parts


def test_text_files_are_grouped_up_to_the_bound(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(10):
        (folder / f"t{i}.txt").write_text(f"text file {i} " * 800)  # ~10 KB each
    _, report = _run(tmp_path, folder, "grouped", 25_000)
    st = report.stage("ingest")
    assert st.manifest["parts"] == 5 and st.manifest["counts"]["kept"] == 10  # two files (~20 KB) per part


def test_a_one_file_corpus_on_s3_is_split_the_same_way(tmp_path, one_file, s3_env):
    from tests.conftest import make_bucket, s3_filesystem

    make_bucket(s3_env, "onefile")
    fs = s3_filesystem(s3_env)
    for kind in ("jsonl", "parquet"):
        fs.put(str(one_file[kind]), f"onefile/{one_file[kind].name}")
    storage = f"""storage:
  s3: {{endpoint_url: "{s3_env['endpoint_url']}", key: "${{AWS_ACCESS_KEY_ID}}", secret: "${{AWS_SECRET_ACCESS_KEY}}"}}
"""
    for kind in ("jsonl", "parquet"):
        runner, local = _run(tmp_path, one_file[kind], f"local-{kind}", None)
        text = PIPELINE.format(work=tmp_path / f"s3-{kind}", data=f"s3://onefile/{one_file[kind].name}", workers=1,
                               bound=f"      max_part_bytes: {BOUND}") + storage
        (tmp_path / f"s3-{kind}.yaml").write_text(text)
        s3_runner = Runner(load_config(tmp_path / f"s3-{kind}.yaml"), use_ray=False, track=False)
        st = s3_runner.run(only="ingest").stage("ingest")
        assert st.manifest["parts"] > 2
        assert _data(s3_runner, st) == _data(runner, local.stage("ingest"))
