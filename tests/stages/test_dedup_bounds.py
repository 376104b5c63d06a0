"""A dedup shuffle's partitions are bounded: an absurd ``num_partitions`` is refused when the
config is validated, and a run never uses more partitions than there are key rows (an exchange
step holds partitions x partitions blocks: 2000 partitions over 198 documents took 9.5 GB)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.runner import Runner
from stages.dedup.stage import MAX_PARTITIONS, usable_partitions

BODY = """
name: bounds
work_dir: {work}
stages:
  ingest:
    uses: ingest
    config: {{sources: [{{name: s, paths: ["{data}"]}}]}}
  exact:
    uses: {uses}
    inputs: [ingest]
    config: {{num_partitions: {partitions}}}
"""


@pytest.mark.parametrize("uses", ["exact_dedup", "minhash_dedup"])
def test_an_absurd_partition_count_is_refused_at_load_naming_the_key(pipeline_file, tmp_path, uses):
    path = pipeline_file(BODY.format(work=tmp_path / "w", data=tmp_path / "in.jsonl", uses=uses, partitions=2000))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: stages.exact.config.num_partitions: Input should be less than or equal to {MAX_PARTITIONS}"


def test_a_run_uses_no_more_partitions_than_key_rows(pipeline_file, tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a b c", "d e f", "a b c", "g h i", "j k l", "d e f"]))
    path = pipeline_file(BODY.format(work=tmp_path / "w", data=data, uses="exact_dedup", partitions=MAX_PARTITIONS))
    stage = Runner(load_config(path), use_ray=False, track=False).run().stage("exact")
    assert stage.manifest["summary"]["data"]["partitions"] == 6  # one key column (the text) per document
    assert stage.manifest["counts"]["kept"] == 4 and stage.manifest["counts"]["rejected"] == {"exact_duplicate": 2}


def test_usable_partitions():
    assert usable_partitions(None, 0, 8) == 1
    assert usable_partitions(200, 198, 8) == 198
    assert usable_partitions(None, 10_000_000, 64) == 32
    assert usable_partitions(3, 10_000_000, 64) == 3
