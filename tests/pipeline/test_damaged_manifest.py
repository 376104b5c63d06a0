"""A ``_manifest.json`` that cannot be read is an output that is not committed: run, explain and
run --force say which file and compute the stage again; lineage names the file; a pipeline file
that is not text is one line naming it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from pipeline import manifest as mf
from pipeline.config import ConfigError, load_config
from pipeline.explain import explain
from pipeline.runner import Runner

BODY = """
name: damaged
work_dir: {work}
stages:
  ingest:
    uses: ingest
    config: {{sources: [{{name: s, paths: ["{data}"]}}]}}
  sample:
    uses: sample
    inputs: [ingest]
    config: {{fraction: 1.0}}
"""


@pytest.fixture
def committed(pipeline_file, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    path = pipeline_file(BODY.format(work=tmp_path / "work", data=data))
    report = Runner(load_config(path), use_ray=False, track=False).run()
    return path, report


def _truncate(stage) -> str:
    uri = mf.manifest_uri(stage.stage_dir)
    with open(uri, "r+b") as f:
        f.truncate(40)
    return uri


@pytest.mark.parametrize("force", [False, True])
def test_a_truncated_manifest_is_recomputed_and_named(committed, caplog, force):
    path, report = committed
    uri = _truncate(report.stage("ingest"))
    mf._warned.clear()
    with caplog.at_level(logging.WARNING, logger="lmpipe"):
        items = explain(Runner(load_config(path), use_ray=False, track=False))
        assert [e.status for e in items] == ["will run", "cached"]
        assert items[0].reasons == [f"{uri}: not a readable stage manifest (40 bytes): Expecting property name enclosed in"
                                    f" double quotes: line 3 column 2 (char 40) -- treated as not committed"]
        again = Runner(load_config(path), use_ray=False, track=False).run(force=force)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(f"{uri}: not a readable stage manifest (40 bytes)") and "treated as not committed" in w
               for w in warnings), warnings
    ingest = again.stage("ingest")
    assert not ingest.cached and ingest.manifest["counts"]["kept"] == 5
    assert mf.read_manifest(load_config(path).storage, ingest.stage_dir) == ingest.manifest  # the commit replaced the damaged file


def test_lineage_of_a_damaged_manifest_names_the_file(committed):
    _, report = committed
    stage = report.stage("sample")
    with open(mf.manifest_uri(stage.stage_dir), "w") as f:
        f.write("[1, 2]")
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "lineage", stage.stage_dir], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{mf.manifest_uri(stage.stage_dir)}: not a readable stage manifest: a JSON list" in lines[0]


def test_a_pipeline_file_that_is_not_text_is_one_line_naming_it(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(b"name: x\n\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match=rf"^{path}: not a text file \(byte 8 is not UTF-8\); a pipeline file is YAML$"):
        load_config(path)
