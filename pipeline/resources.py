"""The one check that a cluster can hold what a stage asks for, shared by the runner (a stage's
per-worker resources) and stages that start their own worker groups (training), so that a run
fails at once naming what is missing instead of waiting forever for resources that do not exist."""

from __future__ import annotations

from typing import Mapping


class StageFailed(RuntimeError):
    """A stage could not produce its output; the message says why in one line."""


class ResourcesUnavailable(StageFailed):
    """The cluster cannot hold the workers a stage needs."""


def check_resources(stage_name: str, per_worker: Mapping[str, float], cluster: Mapping[str, float], workers: int = 1) -> None:
    """Raise ResourcesUnavailable for the first resource (in ``per_worker``'s order: name the
    scarce one first) that ``workers`` workers need beyond what the cluster has."""
    for key, amount in per_worker.items():
        need = float(amount) * workers
        have = float(cluster.get(key, 0.0))
        if need and have < need:
            unit = {"CPU": "CPUs", "GPU": "GPUs"}.get(key, f"of resource {key!r}")
            what = f"{amount:g} {unit} per worker" if workers == 1 else f"{need:g} {unit} ({workers} workers x {amount:g})"
            listed = ", ".join(f"{k}={v:g}" for k, v in sorted(cluster.items()) if not k.startswith("node:") and "memory" not in k)
            raise ResourcesUnavailable(f"stage {stage_name!r} needs {what}; the cluster has {have:g} (cluster resources: {listed})")
