"""An input with no rows (a source allowed to be empty, or filters that drop everything) flows
through every data stage as an empty output with a manifest; a stage that cannot work on nothing
says so naming itself -- never a Ray dump (exact_dedup failed with "Must provide at least one
path" from inside Ray)."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.runner import Runner

PIPELINE = """
name: empty
work_dir: {work}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"], allow_empty: true}}]
  quality_filter:
    uses: quality_filter
    inputs: [ingest]
  exact_dedup:
    uses: exact_dedup
    inputs: [quality_filter]
  minhash_dedup:
    uses: minhash_dedup
    inputs: [exact_dedup]
  decontaminate:
    uses: decontaminate
    inputs: [minhash_dedup]
    config: {{tasks: [mmlu]}}
  train_tokenizer:
    uses: train_tokenizer
    inputs: [decontaminate]
    config: {{vocab_size: 300}}
"""


def test_no_rows_flow_through_the_data_stages_and_the_tokenizer_says_why_it_stops(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.jsonl").write_text("")
    loaded = load_config(_write(tmp_path, PIPELINE.format(work=tmp_path / "work", data=data)))
    with pytest.raises(ValueError, match=r"^stage 'train_tokenizer': its input decontaminate has no documents to train a tokenizer on"):
        Runner(loaded, use_ray=False, track=False).run()
    report = Runner(loaded, use_ray=False, track=False).run(only="decontaminate")
    for stage in ("ingest", "quality_filter", "exact_dedup", "minhash_dedup", "decontaminate"):
        counts = report.stage(stage).manifest["counts"]
        assert counts["rows_in"] == counts["kept"] == 0, stage


def _write(folder, text):
    path = folder / "p.yaml"
    path.write_text(text)
    return str(path)
