"""The stage contract's import rules, checked on the syntax trees of the code (lazy imports
inside functions included): cheaper than a review, and a rule that is a test cannot drift."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports() -> list[tuple[str, str]]:
    """(file relative to the repository, imported module) for every import in pipeline/ and stages/."""
    out = []
    for package in ("pipeline", "stages"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.Import):
                    out += [(rel, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    out += [(rel, node.module)] + [(rel, f"{node.module}.{a.name}") for a in node.names]
    return out


def _top(module: str) -> str:
    return module.split(".")[0]


def test_mlflow_is_imported_only_by_the_tracking_module():
    offenders = sorted({f for f, m in _imports() if _top(m) == "mlflow" and f != "pipeline/tracking.py"})
    assert not offenders, offenders


def test_train_and_evaluate_never_import_each_other():
    """What they share (model, scoring, summaries) lives in packages that import neither, so an
    edit to one never changes the other's code digest."""
    pairs = {("stages/train/", "stages.evaluate"), ("stages/evaluate/", "stages.train")}
    offenders = sorted({(f, m) for f, m in _imports() for folder, other in pairs if f.startswith(folder) and (m == other or m.startswith(other + "."))})
    assert not offenders, offenders



def test_no_stage_reaches_into_the_runner_or_the_executor():
    """Stages see the pipeline through their context and the public modules (stage, contracts,
    resources, storage, ...); the runner's and the executor's internals can change under them."""
    private = ("pipeline.runner", "pipeline.execute")
    offenders = sorted({(f, m) for f, m in _imports() if f.startswith("stages/") and any(m == p or m.startswith(p + ".") for p in private)})
    assert not offenders, offenders


def test_the_run_logger_hands_out_no_raw_mlflow_client():
    """Stages log through RunLogger's methods; a raw client would let MLflow calls spread outside
    pipeline/tracking.py again."""
    from pipeline.tracking import RunLogger

    logger = RunLogger("sqlite:////nonexistent/mlflow.db", "run")
    assert not [name for name in dir(logger) if not name.startswith("_") and "client" in name.lower()]


def test_pipeline_reaches_stages_only_through_the_registry():
    """pipeline/ knows nothing about text or tokens: it finds stages' code through the registry."""
    offenders = sorted({(f, m) for f, m in _imports() if f.startswith("pipeline/") and f != "pipeline/registry.py" and _top(m) == "stages"})
    assert not offenders, offenders


def test_ray_is_imported_only_by_pipeline_and_the_train_launcher():
    """Stage code runs under any executor (and on a GPU machine without Ray); Ray Train's launch
    and checkpoint hand-over live in one module."""
    offenders = sorted({f for f, m in _imports() if _top(m) == "ray" and not f.startswith("pipeline/") and f != "stages/train/launch.py"})
    assert not offenders, offenders


def test_the_stop_signal_actor_loads_nothing_but_its_own_module():
    """The StopSignal actor waits out a whole training run in a process of its own: its module
    imports nothing (a torch import there held ~0.3 GB and 2-8 CPU-s per run, for a flag)."""
    imported = sorted({m for f, m in _imports() if f == "pipeline/stop_signal.py"})
    assert imported == ["__future__", "__future__.annotations", "typing", "typing.Optional"], imported
    from pipeline.stop_signal import StopSignal
    from stages.train import launch

    assert launch.StopSignal is StopSignal  # the launcher's actor is this class


def test_one_fan_out_primitive():
    """Every parallel step of a stage goes through pipeline/fanout.py (``ctx.run_parts`` is built
    on it): no second way (Ray Data, a ``ray.remote`` of one's own) with its own retries,
    progress and lease checks to keep in step."""
    remote = []
    for package in ("pipeline", "stages"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.Attribute) and node.attr == "remote" and isinstance(node.value, ast.Name) and node.value.id == "ray":
                    remote.append(rel)
    # the train launcher's one actor is the stop signal of a Ray Train run, not a fan-out of work
    assert sorted(set(remote)) == ["pipeline/fanout.py", "stages/train/launch.py"]
    assert not sorted({f for f, m in _imports() if m == "ray.data" or m.startswith("ray.data.")})


def test_stages_read_manifests_only_as_typed_contracts():
    """A manifest reaches a stage as the Manifest contract (Stage.check, mf.load_committed) or
    through its input's accessors (files, summary, has_dataset, chars): never as the raw JSON
    object, whose keys a stage could misread or a format change could move under it."""
    raw = {"load_manifest", "read_manifest", "parse_manifest"}
    offenders = []
    for path in sorted((ROOT / "stages").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Attribute) and (node.attr == "manifest" or node.attr in raw):
                offenders.append((rel, node.lineno, node.attr))
            elif isinstance(node, ast.ImportFrom) and node.module == "pipeline.manifest":
                offenders += [(rel, node.lineno, a.name) for a in node.names if a.name in raw]
    assert not offenders, offenders
