"""Ablations in one pipeline file: variants expand into validated configs; a stage a variant does
not change is the base's cached output, computed once; MLflow holds the variants as sibling
pipeline runs under one ablation run; ``explain --variant`` says what a variant recomputes."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.variants import deep_merge, expand_variants, format_plan, plan_variant, run_variants, select_variants
from stages.assets import python_doc_topics

PIPELINE = """
name: ablation
work_dir: {work}
seed: 3
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  quality:
    uses: quality_filter
    inputs: [ingest]
    config: {{gopher_quality: {{min_doc_words: 20, min_alpha_words_ratio: null, max_symbol_word_ratio: null}}, gopher_repetition: {{enabled: false}}, c4: {{enabled: false}}, fineweb: {{enabled: false}}}}
  sample:
    uses: sample
    inputs: [quality]
    config: {{fraction: 0.5}}
variants:
{variants}
"""

VARIANTS = """
  base:
    seeds: [7]
  same_default:  # the default value written out: the same fingerprint as the base
    stages: {quality: {config: {max_doc_chars: 2000000}}}
  stricter:
    stages: {quality: {config: {gopher_quality: {min_doc_words: 200}}}}
"""


@pytest.fixture()
def write(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    texts = list(python_doc_topics().values())[:40]
    (data / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def make(variants: str = VARIANTS) -> str:
        path = tmp_path / "pipeline.yaml"
        indented = "\n".join(line for line in variants.strip("\n").splitlines())
        path.write_text(PIPELINE.format(work=tmp_path / "work", data=data, variants=indented))
        return str(path)

    return make


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 4}
    assert deep_merge(base, {"a": {"c": [3]}, "e": None}) == {"a": {"b": 1, "c": [3]}, "d": 4, "e": None}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 4}  # the base is not modified


def test_variants_expand_with_overrides_merged_and_validated(write):
    variants = expand_variants(load_config(write()))
    assert [v.name for v in variants] == ["base", "base.seed7", "same_default", "stricter"]
    by_name = {v.name: v for v in variants}
    stricter = by_name["stricter"].loaded.declared_stage_configs["quality"]
    assert stricter.gopher_quality.min_doc_words == 200
    assert stricter.gopher_repetition.enabled is False  # the rest of the base's config is kept
    assert by_name["base.seed7"].seed == 7 and by_name["base.seed7"].seed_repeat
    assert by_name["base"].loaded.declared_stage_configs["quality"].gopher_quality.min_doc_words == 20
    assert [v.name for v in select_variants(variants, "stricter", "p.yaml")] == ["stricter"]
    with pytest.raises(ConfigError, match=r"--variant nope: no such variant \(variants: base, base.seed7, same_default, stricter\)"):
        select_variants(variants, "nope", "p.yaml")


@pytest.mark.parametrize("variants, error", [
    ("  hi:\n    stages: {quality: {config: {gopher_quality: {min_doc_wordz: 5}}}}",
     r"pipeline.yaml: variants.hi.stages.quality.config.gopher_quality.min_doc_wordz: unknown key"),
    ("  hi:\n    stages: {quality: {config: {gopher_quality: {min_doc_words: -1}}}}",
     r"variants.hi.stages.quality.config.gopher_quality.min_doc_words: Input should be greater than"),
    ("  hi:\n    stages: {nope: {config: {x: 1}}}", r"variants.hi.stages.nope: no such stage \(stages: ingest, quality, sample\)"),
    ("  hi:\n    stages: {quality: {threshold: 1}}", r"variants.hi.stages.quality.threshold: unknown key"),
    ("  base:\n    stages: {quality: {config: {max_doc_chars: 5}}}", r"variants.base.stages: the base is the pipeline as written"),
    ("  base:\n    seeds: [3]", r"variants.base.seeds\[0\]: seed 3 is already run \(the pipeline seed\)"),
    ("  Hi:\n    seed: 1", r"variants.Hi: a variant name must be snake_case"),
    ("  hi:\n    seeds: [1, 2]", r"variants.hi.seeds: only the base is repeated over seeds"),
])
def test_a_bad_variant_is_refused_naming_its_yaml_path(write, variants, error):
    with pytest.raises(ConfigError, match=error):
        expand_variants(load_config(write(variants)))


def test_unchanged_stages_are_computed_once_across_variants(write, capsys):
    loaded = load_config(write())
    _, runs = run_variants(loaded, expand_variants(loaded), use_ray=False, track=False)
    ran = {r.variant.name: {s.name: not s.cached for s in r.report.stages} for r in runs}
    assert ran == {
        "base": {"ingest": True, "quality": True, "sample": True},
        # another seed: only the stage that draws from the seed runs again
        "base.seed7": {"ingest": False, "quality": False, "sample": True},
        # the default value written out changes nothing
        "same_default": {"ingest": False, "quality": False, "sample": False},
        # a changed field: that stage and what reads it
        "stricter": {"ingest": False, "quality": True, "sample": True},
    }
    stage_dir = {r.variant.name: {s.name: s.stage_dir for s in r.report.stages} for r in runs}
    assert stage_dir["stricter"]["ingest"] == stage_dir["base"]["ingest"]
    kept = {r.variant.name: r.report.stage("quality").manifest["counts"]["kept"] for r in runs}
    assert kept["stricter"] < kept["base"] == kept["same_default"]

    # gc keeps every variant's outputs: they are all current outputs of the file
    from pipeline.cleanup import plan_gc

    assert stage_dir["stricter"]["quality"] in {r.uri for r in plan_gc([loaded]).remove}  # the base alone does not reach it
    capsys.readouterr()
    assert main(["gc", loaded.path]) == 0
    assert capsys.readouterr().out.strip().endswith("nothing to remove")


def test_explain_variant_says_what_it_recomputes_and_why(write):
    from pipeline.runner import Runner

    variants = {v.name: v for v in expand_variants(load_config(write()))}
    base = Runner(variants["base"].loaded, use_ray=False, track=False)
    plan = {p.stage: p for p in plan_variant(base, Runner(variants["stricter"].loaded, use_ray=False, track=False))}
    assert plan["ingest"].shared and not plan["quality"].shared and not plan["sample"].shared
    assert plan["quality"].reasons == ["config.gopher_quality.min_doc_words: 20 -> 200"]
    assert plan["sample"].reasons[0].startswith("input quality changed:")
    text = format_plan(variants["stricter"], list(plan.values()))
    assert "variant stricter: 2 of 3 stage(s) differ from the base, 2 not computed yet" in text
    seed_plan = {p.stage: p for p in plan_variant(base, Runner(variants["base.seed7"].loaded, use_ray=False, track=False))}
    assert seed_plan["sample"].reasons == ["seed changed: 3 -> 7"] and seed_plan["quality"].shared


def test_variants_are_sibling_runs_under_one_ablation_run(write, ray_local, capsys):
    from mlflow import MlflowClient

    path = write("  stricter:\n    stages: {quality: {config: {gopher_quality: {min_doc_words: 200}}}}")
    assert main(["run", path]) == 0
    out = capsys.readouterr().out
    assert "[variant stricter]" in out and "ablation run" in out
    uri = load_config(path).resolved.tracking_uri()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lmpipe").experiment_id
    (ablation,) = client.search_runs([exp], "tags.`lmpipe.kind` = 'ablation'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{ablation.info.run_id}'")
    tags = {c.data.tags["lmpipe.variant"]: c.data.tags for c in children}
    assert set(tags) == {"base", "stricter"} and all(t["lmpipe.kind"] == "pipeline" for t in tags.values())
    assert json.loads(tags["stricter"]["lmpipe.variant_overrides"]) == {"stages": {"quality": {"config": {"gopher_quality": {"min_doc_words": 200}}}}}
    assert json.loads(tags["base"]["lmpipe.variant_overrides"]) == {}
    assert ablation.info.status == "FINISHED"

    # one variant alone: everything it needs is cached
    assert main(["run", path, "--variant", "stricter"]) == 0
    assert "ran    " not in capsys.readouterr().out
    assert main(["explain", path, "--variant", "stricter"]) == 0
    assert "quality  own (cached)" in capsys.readouterr().out


def test_the_shipped_ablation_example_expands(monkeypatch):
    from pathlib import Path

    loaded = load_config(Path(__file__).parents[2] / "examples" / "ablation.yaml")
    variants = {v.name: v for v in expand_variants(loaded)}
    assert list(variants) == ["base", "base.seed1", "base.seed2", "strict_quality", "loose_quality", "news_heavy"]
    base = variants["base"].loaded.declared_stage_configs
    for name, changed in (("strict_quality", "quality_filter"), ("loose_quality", "quality_filter"), ("news_heavy", "tokenize")):
        ours = variants[name].loaded.declared_stage_configs
        assert [s for s in base if ours[s] != base[s]] == [changed]
    assert variants["strict_quality"].loaded.declared_stage_configs["quality_filter"].gopher_quality.min_doc_words == 100
    assert variants["base.seed2"].seed == 2


def test_an_ablation_run_whose_driver_died_is_closed(tmp_path):
    import subprocess
    import sys

    from mlflow import MlflowClient

    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "lmpipe")
    run_id = tracker.start_ablation("p", str(tmp_path / "p.yaml"), "name: p\n", {"base": {}}, tags={})
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    MlflowClient(uri).set_tag(run_id, "lmpipe.pid", gone)  # as if its driver had been that process
    assert tracker.close_dead_runs() == [run_id]
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    assert tracker.latest_ablation_run("p", str(tmp_path / "p.yaml")) == run_id
