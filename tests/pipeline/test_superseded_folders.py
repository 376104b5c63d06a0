"""Folders a stage keeps beside its attempts (train's Ray Train runs, with their checkpoints) go
once no committed output uses them: after the commit that supersedes them, and by ``lmpipe gc``,
with the protections of superseded attempts."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pyarrow as pa

from pipeline import manifest as mf
from pipeline.cleanup import SUPERSEDED_WORK, apply_gc, plan_gc
from pipeline.config import load_config
from pipeline.locks import ReaderLease
from pipeline.registry import register
from pipeline.runner import Runner
from pipeline.stage import DatasetStage
from pipeline.storage import Storage

PREFIX = "scratch-"


@register
class ScratchWriter(DatasetStage):
    """Writes a work folder per computation next to its attempt (as train writes a Ray Train run)."""

    name: ClassVar[str] = "test_scratch_writer"
    num_inputs = (0, 0)
    measure_column = None
    new_rows = True
    produces = ("n",)

    def run(self, ctx) -> None:
        ctx.storage.write_bytes_atomic(f"{ctx.stage_dir}/{PREFIX}{ctx.attempt}/state.bin", b"x" * 1000)
        out = ctx.part_outputs("data", measure_column=None)
        out.write("data", pa.table({"n": [1, 2, 3]}))
        ctx.add_part_result(out.close())

    @classmethod
    def superseded_folders(cls, manifest, folders: list[str]) -> list[str]:
        return [f for f in folders if f.startswith(PREFIX) and f != PREFIX + manifest.attempt]


def _pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"name: scratch\nwork_dir: {tmp_path / 'work'}\nstages:\n  s:\n    uses: test_scratch_writer\n")
    return path


def _run(path: Path, **kwargs):
    return Runner(load_config(str(path)), use_ray=False, track=False).run(**kwargs)


def _scratch(stage_dir: str) -> list[str]:
    return sorted(p.name for p in Path(stage_dir).iterdir() if p.name.startswith(PREFIX))


def test_a_recommit_removes_the_work_folder_of_the_output_it_replaces(tmp_path):
    path = _pipeline(tmp_path)
    stage_dir = _run(path).stage("s").stage_dir
    [first] = _scratch(stage_dir)
    _run(path, force=True)
    committed = mf.load_committed(Storage(), stage_dir)
    assert _scratch(stage_dir) == [PREFIX + committed.attempt] != [first]


def test_a_reader_keeps_superseded_work_folders_and_gc_removes_them_afterwards(tmp_path):
    path = _pipeline(tmp_path)
    stage_dir = _run(path).stage("s").stage_dir
    [first] = _scratch(stage_dir)
    with ReaderLease(Storage(), str(tmp_path / "work"), [stage_dir], run="reader"):
        _run(path, force=True)  # the reader may still use the first computation's folder
        assert len(_scratch(stage_dir)) == 2
        plan = plan_gc([load_config(str(path))])
        assert not [r for r in plan.remove if r.reason == SUPERSEDED_WORK]
        assert [k.uri for k in plan.kept if k.uri.endswith(first)]
    plan = plan_gc([load_config(str(path))])
    [removal] = [r for r in plan.remove if r.reason == SUPERSEDED_WORK]
    assert removal.uri.endswith(first) and removal.bytes == 1000
    apply_gc(plan)
    assert _scratch(stage_dir) == [PREFIX + mf.load_committed(Storage(), stage_dir).attempt]
