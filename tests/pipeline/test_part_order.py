"""The runner starts a stage's largest parts first (their sizes from the upstream manifest), so a
large part does not run alone after the small ones; results and outputs stay in part order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

import tests.pipeline.worker_state_stage  # noqa: F401  (registers tag_rows)
from pipeline.config import load_config
from pipeline.runner import Runner, largest_first
from pipeline.stage import Part


def test_largest_first_keeps_part_order_among_equals_and_unknown_sizes():
    parts = [Part("00000", {}, 10), Part("00001", {}, 0), Part("00002", {}, 500), Part("00003", {}, 10), Part("00004", {})]
    assert [p.id for p in largest_first(parts)] == ["00002", "00000", "00003", "00001", "00004"]


def test_a_row_stage_starts_its_largest_part_first_and_writes_in_part_order(ray_local, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sizes = {"a": 20, "b": 400, "c": 20}  # documents per file: b's part is the largest
    for name, n in sizes.items():
        with open(data / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"file-{name} document {i} " * 8}) + "\n")
    order = tmp_path / "order.txt"
    path = tmp_path / "p.yaml"
    path.write_text(f"""name: order
work_dir: {tmp_path}/work
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  tag:
    uses: tag_rows
    inputs: [ingest]
    resources: {{max_workers: 1}}
    config: {{tag: t, order_file: "{order}"}}
""")
    report = Runner(load_config(path), track=False).run()
    started = [line.split()[0] for line in order.read_text().splitlines()]
    assert started[0] == "file-b", started  # one worker: the parts ran in the order they were started
    tag = report.stage("tag")
    files = [f["path"] for f in tag.manifest["datasets"]["data"]["files"]]
    assert files == sorted(files)
    first = [pq.read_table(Path(tag.stage_dir) / f).column("text")[0].as_py().split()[0] for f in files]
    assert first == ["file-a", "file-b", "file-c"]  # outputs in part order, whatever order the parts ran in
