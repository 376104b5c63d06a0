"""Where training starts, decided on the driver without Ray: the Ray Train run a computation
continues or replaces, and ``checkpoint.resume_from`` checked before any worker starts."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from pipeline import manifest as mf
from pipeline.storage import Storage
from stages.train.config import TrainStageConfig
from stages.train.stage import TrainStage, ray_train_run


def stage_ctx(stage_dir, attempt: str, lease_lost: bool = False):
    def check() -> None:  # the runner's lease check, as ctx.fan_out.check
        if lease_lost:
            raise RuntimeError("lease on train lost to another run")

    return SimpleNamespace(stage_dir=str(stage_dir), attempt=attempt, stage_name="train", storage=Storage(),
                           fan_out=SimpleNamespace(check=check))


def committed_manifest(ray_train_run: str) -> dict:
    """The least a committed train output's manifest holds: the Ray Train run it came from."""
    return {"format": mf.MANIFEST_FORMAT, "pipeline": "p", "stage": "train", "uses": "train", "version": "2", "fingerprint": "f",
            "attempt": "attempt-aaa", "config": {}, "datasets": {}, "counts": {"rows_in": 0, "kept": 0},
            "timings": {"started_at": "2026-12-03T00:00:00Z", "wall_seconds": 1.0},
            "summary": {"kind": "train", "data": {"final_checkpoint": "x", "steps": 1, "tokens_seen": 1, "ray_train_run": ray_train_run}}}


def test_a_rerun_continues_its_run_and_a_replacement_starts_a_new_one(tmp_path):
    storage = Storage()
    first = ray_train_run(stage_ctx(tmp_path, "attempt-aaa"))
    os.makedirs(tmp_path / first)
    # crashed before committing: the next computation continues the same Ray Train run
    assert ray_train_run(stage_ctx(tmp_path, "attempt-bbb")) == first
    storage.write_json_atomic(mf.manifest_uri(str(tmp_path)), committed_manifest(str(tmp_path / first)))
    # a committed output being replaced (--force, --stage): a new run, so training starts afresh
    forced = ray_train_run(stage_ctx(tmp_path, "attempt-ccc"))
    assert forced not in (first, "") and os.path.isdir(tmp_path / first)  # the committed run stays while it is committed
    os.makedirs(tmp_path / forced)  # this replacement dies; the next one removes its run, never the committed one
    with pytest.raises(RuntimeError, match="lease on train lost"):  # only while the stage's lease is ours
        ray_train_run(stage_ctx(tmp_path, "attempt-ddd", lease_lost=True))
    assert os.path.isdir(tmp_path / forced)
    again = ray_train_run(stage_ctx(tmp_path, "attempt-ddd"))
    assert again not in (first, forced) and not os.path.exists(tmp_path / forced) and os.path.isdir(tmp_path / first)


def test_resume_from_a_folder_without_a_checkpoint_names_the_key(tmp_path):
    stage = TrainStage(TrainStageConfig.model_validate({"checkpoint": {"resume_from": str(tmp_path / "nothing")}}))
    with pytest.raises(ValueError, match=r"stages\.train\.config\.checkpoint\.resume_from: .*nothing is not a complete checkpoint "
                                         r"\(no model_config.json, .metadata\)"):
        stage.external_inputs(stage_ctx(tmp_path, "attempt-aaa"))
