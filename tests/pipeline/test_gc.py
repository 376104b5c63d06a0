"""``lmpipe gc FILE...``: lists (``--yes``: removes) the stage outputs the named pipeline files no
longer reach and the superseded attempts, with the bytes they hold; never an output a named file
uses, nor what a live lock or reader lease protects."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline.cleanup import human_bytes, plan_gc
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.locks import ReaderLease, StageLock
from pipeline.runner import Runner
from pipeline.storage import Storage
from stages.assets import python_doc_topics

PIPELINE = """
name: gc
work_dir: {work}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  sample:
    uses: sample
    inputs: [ingest]
    config: {{fraction: {fraction}}}
"""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _run(path: Path, **kwargs):
    return Runner(load_config(str(path)), use_ray=False, track=False).run(**kwargs)


@pytest.fixture()
def two_configs(tmp_path):
    """The same work dir after two sample fractions (``old`` ran first, then ``new``), and an
    earlier commit of ingest kept as a superseded attempt (a reader held it at the recommit)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in list(python_doc_topics().values())[:20]))
    paths = {}
    for name, fraction in (("old", 0.5), ("new", 0.25)):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(PIPELINE.format(work=tmp_path / "work", data=data, fraction=fraction))
    old = _run(paths["old"])
    new = _run(paths["new"])
    ingest = Path(new.stage("ingest").stage_dir)
    with ReaderLease(Storage(), str(tmp_path / "work"), [str(ingest)], run="reader"):
        _run(paths["new"], only="ingest", force=True)  # a new commit; the reader keeps the first one
    return paths, Path(old.stage("sample").stage_dir), Path(new.stage("sample").stage_dir), ingest


def test_gc_lists_then_removes_what_no_named_pipeline_reaches_and_superseded_attempts(two_configs, capsys):
    paths, old_sample, new_sample, ingest = two_configs
    committed = mf.load_manifest(Storage(), str(ingest))["attempt"]
    [superseded] = [p for p in ingest.glob("attempt-*") if p.name != committed]

    assert main(["gc", str(paths["new"])]) == 0  # a dry run: lists, removes nothing
    out = capsys.readouterr().out
    assert f"{old_sample}  (no named pipeline reaches it)" in out and f"{superseded}  (superseded attempt" in out
    assert str(new_sample) not in out and f"{ingest}/{committed}" not in out
    assert old_sample.is_dir() and superseded.is_dir()

    assert main(["gc", str(paths["old"]), str(paths["new"])]) == 0  # both files named: both samples are used
    out = capsys.readouterr().out
    assert str(old_sample) not in out and str(superseded) in out

    with StageLock(Storage(), str(old_sample), "sample", run="computing"):  # a live lock protects it
        assert main(["gc", str(paths["new"]), "--yes"]) == 0
        out = capsys.readouterr().out
        assert "keep" in out and "being computed by" in out and "pipeline run computing" in out
        assert old_sample.is_dir() and not superseded.exists()
    with ReaderLease(Storage(), str(old_sample.parent.parent), [str(old_sample)], run="reading"):  # so does a live reader
        assert main(["gc", str(paths["new"]), "--yes"]) == 0
        assert "read by a running pipeline" in capsys.readouterr().out and old_sample.is_dir()

    freed = human_bytes(_size(old_sample))
    assert main(["gc", str(paths["new"]), "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"removed {freed:>10}  {old_sample}  (no named pipeline reaches it)" in out and f"freed {freed} in 1 path(s)" in out
    assert [p.name for p in old_sample.parent.iterdir()] == [new_sample.name]

    again = _run(paths["new"])  # the named pipeline's outputs are all still there, committed
    assert [s.cached for s in again.stages] == [True, True]
    for s in again.stages:
        assert all(os.path.exists(f) for f in mf.dataset_files(s.manifest, s.stage_dir))
    assert main(["gc", str(paths["new"])]) == 0 and "nothing to remove" in capsys.readouterr().out


def test_gc_counts_the_bytes_it_frees(two_configs, capsys):
    paths, old_sample, _, ingest = two_configs
    committed = mf.load_manifest(Storage(), str(ingest))["attempt"]
    expected = _size(old_sample) + sum(_size(p) for p in ingest.glob("attempt-*") if p.name != committed)
    plan = plan_gc([load_config(str(paths["new"]))])
    assert plan.bytes == expected
    assert sorted(r.uri for r in plan.remove) == sorted([str(old_sample)] + [str(p) for p in ingest.glob("attempt-*") if p.name != committed])
