"""Reading evaluate outputs back, on the pipeline side: one output's rows (``lmpipe eval-table``)
and every variant's rows compared (``lmpipe compare``, ``lmpipe release``). The stage that wrote
them, found through the registry, only renders and compares them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import manifest as mf
from pipeline import storage as st
from pipeline.config import ConfigError, LoadedConfig
from pipeline.registry import get_stage_class
from pipeline.stage import Comparison


def evaluate_rows(storage: st.Storage, stage_dir: str) -> list[dict[str, Any]]:
    """The ``data`` rows of a committed evaluate output."""
    from pipeline.io import read_table

    manifest = mf.load_manifest(storage, stage_dir)
    if manifest is None:
        raise FileNotFoundError(f"{stage_dir}: no committed stage output")
    if manifest.get("uses") != "evaluate":
        raise ValueError(f"{stage_dir}: stage {manifest.get('stage')!r} is a {manifest.get('uses')!r} stage, not evaluate")
    files = mf.dataset_files(manifest, stage_dir, "data")
    return read_table(storage, files).to_pylist() if files else []


def evaluate_stage(loaded: LoadedConfig, stage: str | None = None) -> str:
    """The evaluate stage a comparison reads: ``stage``, else the file's only one."""
    found = [stage] if stage else [name for name, e in loaded.declared.stages.items() if e.uses == "evaluate"]
    if len(found) != 1 or found[0] not in loaded.declared.stages:
        raise ConfigError(f"{loaded.path}: compare reads one evaluate stage (found: {', '.join(found) or 'none'}); name it with --stage")
    return found[0]


@dataclass(frozen=True)
class VariantComparison:
    comparison: Comparison
    evaluated: list[str]  # variants whose evaluate output is committed, in file order
    missing: list[str]  # variants not evaluated yet


def compare_variants(loaded: LoadedConfig, stage: str, sigmas: float) -> VariantComparison:
    """Each variant's committed evaluate output (the one its fingerprints point to) compared
    against the base and the base's seed noise."""
    from pipeline.runner import Runner
    from pipeline.variants import expand_variants

    variants = expand_variants(loaded)
    results, missing = {}, []
    for v in variants:
        runner = Runner(v.loaded, use_ray=False, track=False)
        stage_dir = mf.stage_uri(runner.work_dir, stage, runner.fingerprints()[stage].value)
        if mf.load_manifest(runner.storage, stage_dir) is None:
            missing.append(v.name)
            continue
        results[v.name] = evaluate_rows(runner.storage, stage_dir)
    if "base" not in results:
        raise FileNotFoundError(f"{loaded.path}: the base has no committed {stage!r} output; run `lmpipe run {loaded.path}` first")
    base_runs = [v.name for v in variants if v.is_base or v.seed_repeat]
    comparison = get_stage_class(loaded.declared.stages[stage].uses).compare_outputs(
        results, base_runs, sigmas=sigmas, title=loaded.declared.name)
    return VariantComparison(comparison, list(results), missing)
