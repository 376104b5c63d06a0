"""Pipeline files are validated completely before any work; errors name the YAML path."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.dag import build_dag, downstream_of, upstream_of

GOOD = """
name: t
work_dir: ./work
stages:
  ingest:
    uses: ingest
    config:
      sources: [{name: a, paths: ["data/*.jsonl"]}]
  sample:
    uses: sample
    inputs: [ingest]
    config: {fraction: 0.5}
"""


def test_good_config_resolves_paths_relative_to_the_file(pipeline_file, tmp_path):
    loaded = load_config(pipeline_file(GOOD))
    assert loaded.resolved.work_dir == str(tmp_path / "work")
    assert loaded.declared.work_dir == "./work"  # the declared view keeps what the user wrote
    assert loaded.resolved_stage_configs["ingest"].sources[0].paths == [str(tmp_path / "data/*.jsonl")]
    assert loaded.resolved.tracking_uri() == f"sqlite:///{tmp_path}/work/mlflow.db"
    assert [n.name for n in build_dag(loaded)] == ["ingest", "sample"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s.replace("fraction: 0.5", "fraction: 0"), "stages.sample.config.fraction: Input should be greater than 0"),
        (lambda s: s.replace("fraction: 0.5", "fraction: 0.5, fractoin: 1"), "stages.sample.config.fractoin: unknown key"),
        (lambda s: s.replace("name: t\n", "name: t\nwrok_dir: x\n"), "wrok_dir: unknown key"),
        (lambda s: s.replace("uses: sample", "uses: smaple"), "stages.sample.uses: unknown stage 'smaple'"),
        (lambda s: s.replace("inputs: [ingest]", "inputs: [ingset]"), "stages.sample.inputs[0]: no stage named 'ingset'"),
        (lambda s: s.replace("inputs: [ingest]", "inputs: [ingest.rejected]"), "stage 'ingest' has no dataset 'rejected'"),
        (lambda s: s.replace("inputs: [ingest]", "inputs: []"), "stages.sample.inputs: stage 'sample' takes exactly 1 input(s), got 0"),
        (lambda s: s.replace('paths: ["data/*.jsonl"]', "paths: []"), "stages.ingest.config.sources[0].paths: List should have at least 1 item"),
        (lambda s: s.replace("{name: a,", "{name: 'a b',"), "stages.ingest.config.sources[0].name: Value error"),
        (lambda s: s.replace("stages:\n", "stages:\n  Bad-Name:\n    uses: ingest\n    config: {sources: [{name: x, paths: [y]}]}\n"), "must be snake_case"),
    ],
)
def test_errors_name_the_yaml_path(pipeline_file, mutate, expected):
    path = pipeline_file(mutate(GOOD))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_cycle_is_rejected(pipeline_file):
    body = GOOD + """
  a:
    uses: sample
    inputs: [b]
    config: {fraction: 0.5}
  b:
    uses: sample
    inputs: [a]
    config: {fraction: 0.5}
"""
    with pytest.raises(ConfigError, match="cycle among a, b"):
        load_config(pipeline_file(body))


def test_env_references_are_substituted_only_in_the_resolved_view(pipeline_file, monkeypatch):
    monkeypatch.setenv("LMPIPE_TEST_SECRET", "s3cr3t-value")
    body = GOOD + """
storage:
  s3:
    endpoint_url: http://127.0.0.1:9
    key: ${LMPIPE_TEST_SECRET}
    secret: ${LMPIPE_TEST_SECRET}
"""
    loaded = load_config(pipeline_file(body))
    assert loaded.resolved.storage.s3.secret == "s3cr3t-value"
    assert loaded.declared.storage.s3.secret == "${LMPIPE_TEST_SECRET}"
    assert "s3cr3t-value" not in loaded.text
    assert loaded.storage.options["s3"]["key"] == "s3cr3t-value"


def test_missing_env_variable_names_the_key(pipeline_file, monkeypatch):
    monkeypatch.delenv("LMPIPE_NOT_SET", raising=False)
    body = GOOD.replace('paths: ["data/*.jsonl"]', 'paths: ["${LMPIPE_NOT_SET}/x.jsonl"]')
    with pytest.raises(ConfigError, match=r"stages.ingest.config.sources\[0\].paths\[0\]: environment variable LMPIPE_NOT_SET is not set"):
        load_config(pipeline_file(body))


def test_not_yaml_and_not_a_mapping(pipeline_file):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(pipeline_file("name: [unclosed"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(pipeline_file("- a\n- b\n"))


def test_dag_helpers(pipeline_file):
    body = GOOD + """
  tail:
    uses: sample
    inputs: [sample]
    config: {fraction: 0.5}
"""
    order = build_dag(load_config(pipeline_file(body)))
    assert downstream_of(order, "sample") == ["sample", "tail"]
    assert upstream_of(order, "tail") == ["ingest", "sample"]


def test_column_contracts_are_checked_before_running(pipeline_file):
    """A stage whose rows are new records (``new_rows``: tokenizer, tokenize, train, evaluate,
    sources) passes on only what it produces; row stages pass the input's columns through."""
    ok = GOOD + """
  tokenizer:
    uses: train_tokenizer
    inputs: [sample]
  quality:
    uses: quality_filter
    inputs: [sample]
"""
    assert [n.name for n in build_dag(load_config(pipeline_file(ok)))][-2:] == ["tokenizer", "quality"]
    bad = GOOD + """
  tokenizer:
    uses: train_tokenizer
    inputs: [sample]
  quality:
    uses: quality_filter
    inputs: [tokenizer]
"""
    with pytest.raises(ConfigError, match=r"stages\.quality: stage 'quality_filter' requires column\(s\) \['text'\] that 'tokenizer' does not produce"):
        build_dag(load_config(pipeline_file(bad)))
