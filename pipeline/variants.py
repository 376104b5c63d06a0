"""Ablations: one pipeline file, its ``variants:`` expanded into one :class:`LoadedConfig` each.

A variant is the pipeline as written with some stage configs deep-merged with overrides (and
optionally another seed). Each expanded config is validated like the base (every error names
its YAML path, ``variants.hi_quality.stages.quality_filter.config.threshold``) before anything
runs. Nothing else is special about a variant: the runner fingerprints its stages as usual, so a
stage whose config and inputs are the same as in the base (or another variant) has the same
fingerprint, the same folder ``<work_dir>/<stage>/<fingerprint>``, and is computed once.

``variants.base.seeds: [1, 2]`` repeats the base with those seeds (variants ``base.seed1``,
``base.seed2``): the spread of their results is the seed noise a variant's difference is
measured against (``lmpipe compare``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Optional

from pydantic import ValidationError

from pipeline.config import STAGE_NAME, ConfigError, LoadedConfig, format_validation_error, substitute_env
from pipeline.dag import build_dag
from pipeline.registry import get_stage_class

BASE = "base"


@dataclass(frozen=True)
class Variant:
    """One pipeline of an ablation."""

    name: str  # "base", a variant's name, or "base.seed<N>" (a repeat of the base)
    loaded: LoadedConfig
    overrides: dict[str, Any]  # what differs from the base, as written: {"seed": ..., "stages": {stage: {"config": {...}}}}
    seed_repeat: bool = False  # the base with another seed (seed noise), not a change under study

    @property
    def is_base(self) -> bool:
        return self.name == BASE

    @property
    def seed(self) -> int:
        return self.loaded.declared.seed


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` over ``base``: mappings merge key by key, anything else (a list, a number, null) replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def repeat_name(seed: int) -> str:
    return f"{BASE}.seed{seed}"


def expand_variants(loaded: LoadedConfig) -> list[Variant]:
    """The base and every variant of the file (the base alone when it has no ``variants:``), each
    validated; a ConfigError names the YAML path of the first problem."""
    declared = loaded.declared
    out = [Variant(BASE, loaded, {})]
    base_spec = declared.variants.get(BASE)
    if base_spec is not None:
        if base_spec.stages or base_spec.seed is not None:
            key = "stages" if base_spec.stages else "seed"
            raise ConfigError(f"{loaded.path}: variants.base.{key}: the base is the pipeline as written; under variants.base only"
                              f" seeds (repeats of the base) may be set -- put a change in a named variant")
        seen: set[int] = set()
        for i, seed in enumerate(base_spec.seeds):
            if seed == declared.seed or seed in seen:
                raise ConfigError(f"{loaded.path}: variants.base.seeds[{i}]: seed {seed} is already run"
                                  f"{' (the pipeline seed)' if seed == declared.seed else ''}; each repeat needs another seed")
            seen.add(seed)
            out.append(Variant(repeat_name(seed), _with_overrides(loaded, repeat_name(seed), seed, {}), {"seed": seed}, seed_repeat=True))
    for name, spec in declared.variants.items():
        if name == BASE:
            continue
        if not STAGE_NAME.match(name):
            raise ConfigError(f"{loaded.path}: variants.{name}: a variant name must be snake_case ([a-z][a-z0-9_]*)")
        if spec.seeds:
            raise ConfigError(f"{loaded.path}: variants.{name}.seeds: only the base is repeated over seeds (variants.base.seeds);"
                              f" a variant sets one seed")
        overrides: dict[str, Any] = {}
        if spec.seed is not None:
            overrides["seed"] = spec.seed
        if spec.stages:
            overrides["stages"] = {stage: {"config": s.config} for stage, s in spec.stages.items()}
        stage_configs = {stage: s.config for stage, s in spec.stages.items()}
        out.append(Variant(name, _with_overrides(loaded, name, spec.seed, stage_configs), overrides))
    return out


def select_variants(variants: list[Variant], name: Optional[str], path: str) -> list[Variant]:
    """All of them, or the one named (``--variant NAME``)."""
    if name is None:
        return variants
    chosen = [v for v in variants if v.name == name]
    if not chosen:
        raise ConfigError(f"{path}: --variant {name}: no such variant (variants: {', '.join(v.name for v in variants)})")
    return chosen


def _with_overrides(loaded: LoadedConfig, name: str, seed: Optional[int], stage_configs: dict[str, dict[str, Any]]) -> LoadedConfig:
    """The base config with ``stage_configs`` merged in and validated (declared and resolved views)."""
    declared, resolved = loaded.declared, loaded.resolved
    declared_stages, resolved_stages = dict(declared.stages), dict(resolved.stages)
    declared_cfgs, resolved_cfgs = dict(loaded.declared_stage_configs), dict(loaded.resolved_stage_configs)
    for stage, override in stage_configs.items():
        where = f"variants.{name}.stages.{stage}"
        if stage not in declared.stages:
            raise ConfigError(f"{loaded.path}: {where}: no such stage (stages: {', '.join(declared.stages)})")
        cls = get_stage_class(declared.stages[stage].uses)
        try:
            resolved_override = substitute_env(override, f"{where}.config")
        except ConfigError as e:
            raise ConfigError(f"{loaded.path}: {e}") from None
        declared_raw = deep_merge(declared.stages[stage].config, override)
        resolved_raw = deep_merge(resolved.stages[stage].config, resolved_override)
        declared_cfgs[stage] = _validate(cls.Config, declared_raw, f"{where}.config", loaded, resolve_paths=False)
        resolved_cfgs[stage] = _validate(cls.Config, resolved_raw, f"{where}.config", loaded, resolve_paths=True)
        declared_stages[stage] = declared.stages[stage].model_copy(update={"config": declared_raw})
        resolved_stages[stage] = resolved.stages[stage].model_copy(update={"config": resolved_raw})
    seed_update = {} if seed is None else {"seed": seed}
    variant = replace(
        loaded,
        declared=declared.model_copy(update={"stages": declared_stages, **seed_update}),
        resolved=resolved.model_copy(update={"stages": resolved_stages, **seed_update}),
        declared_stage_configs=declared_cfgs,
        resolved_stage_configs=resolved_cfgs,
    )
    try:
        build_dag(variant)  # an override may change what a stage produces: the column contracts again
    except ConfigError as e:
        raise ConfigError(f"variants.{name}: {e}") from None
    return variant


def _validate(model, data: Any, prefix: str, loaded: LoadedConfig, resolve_paths: bool) -> Any:
    try:
        return model.model_validate(data, context={"base_dir": loaded.base_dir if resolve_paths else None})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix, loaded.path)) from None


# -- what a variant recomputes ------------------------------------------------------------------------

@dataclass(frozen=True)
class VariantStagePlan:
    stage: str
    fingerprint: str
    shared: bool  # the same output as the base's (same fingerprint)
    reasons: list[str]  # why it differs from the base's
    cached: bool  # committed already (by the base, another variant or an earlier run)


def plan_variant(base_runner, variant_runner) -> list[VariantStagePlan]:
    """Stage by stage: whether the variant shares the base's output or recomputes it, and why
    (the fingerprint inputs that differ: a config field, the seed, an upstream output)."""
    from pipeline import manifest as mf
    from pipeline.explain import differences

    base, ours = base_runner.fingerprints(), variant_runner.fingerprints()
    out = []
    for name, fp in ours.items():
        cached = mf.load_manifest(variant_runner.storage, mf.stage_uri(variant_runner.work_dir, name, fp.value)) is not None
        theirs = base[name]
        if theirs.value == fp.value:
            out.append(VariantStagePlan(name, fp.value, True, [], cached))
        else:
            out.append(VariantStagePlan(name, fp.value, False, differences(theirs.payload, fp.payload, theirs.code_files, fp.code_files), cached))
    return out


def format_plan(variant: Variant, plan: list[VariantStagePlan]) -> str:
    width = max((len(p.stage) for p in plan), default=5)
    recomputed = [p for p in plan if not p.shared]
    lines = [f"variant {variant.name}: {len(recomputed)} of {len(plan)} stage(s) differ from the base"
             + (f", {sum(not p.cached for p in recomputed)} not computed yet" if recomputed else "")]
    for p in plan:
        if p.shared:
            lines.append(f"  {p.stage:<{width}}  shared with base   {p.fingerprint}{'  (cached)' if p.cached else ''}")
            continue
        lines.append(f"  {p.stage:<{width}}  {'recomputed' if not p.cached else 'own (cached)':<17}  {p.fingerprint}")
        lines += [f"  {'':<{width}}    - {r}" for r in p.reasons]
    return "\n".join(lines)


# -- running an ablation ------------------------------------------------------------------------------

@dataclass
class VariantRun:
    variant: Variant
    runner: Any  # pipeline.runner.Runner
    report: Any  # pipeline.runner.RunReport


def run_variants(loaded: LoadedConfig, variants: list[Variant], address: Optional[str] = None, use_ray: bool = True,
                 track: bool = True, **run_args: Any) -> tuple[Optional[str], list[VariantRun]]:
    """Run each variant in turn, as sibling pipeline runs under one ablation run in MLflow; returns
    the ablation run's id and each variant's run. A stage output a variant shares with one run
    before it is found committed (the fingerprints are the same) and not computed again."""
    from pipeline.runner import Runner

    runs: list[VariantRun] = []
    ablation_id: Optional[str] = None
    first = Runner(variants[0].loaded, address=address, use_ray=use_ray, track=track)  # checks addresses, opens the store
    tracker = first.tracker
    if tracker is not None:
        ablation_id = tracker.start_ablation(loaded.declared.name, loaded.path, loaded.text, {v.name: v.overrides for v in variants},
                                             tags={"lmpipe.work_dir": loaded.resolved.work_dir})
    status = "FAILED"
    try:
        for i, variant in enumerate(variants):
            runner = first if i == 0 else Runner(variant.loaded, address=address, use_ray=use_ray, track=track)
            tags = tracker.variant_tags(ablation_id, variant.name, variant.overrides) if tracker is not None else {}
            runs.append(VariantRun(variant, runner, runner.run(tags=tags, **run_args)))
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.end_ablation(ablation_id, status, {
                r.variant.name: {"pipeline_run_id": r.report.pipeline_run_id, "overrides": r.variant.overrides,
                                 "stages": {s.name: {"fingerprint": s.fingerprint, "cached": s.cached} for s in r.report.stages}}
                for r in runs})
    return ablation_id, runs
