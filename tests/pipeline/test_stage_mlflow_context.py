"""A DatasetStage sees its own MLflow run id and tracking URI (to log as it goes)."""

from __future__ import annotations

from typing import ClassVar, Optional

from pipeline.config import load_config
from pipeline.registry import register
from pipeline.runner import Runner
from pipeline.stage import DatasetStage, StageSummary


class _SeenRun(StageSummary):
    kind = "test_seen_run"

    run_id: Optional[str]
    tracking_uri: Optional[str]


@register
class _RecordsMlflowContext(DatasetStage):
    name: ClassVar[str] = "test_records_mlflow_context"
    num_inputs = (0, 0)
    Summary = _SeenRun

    def run(self, ctx) -> None:
        ctx.set_summary(_SeenRun(run_id=ctx.mlflow_run_id, tracking_uri=ctx.tracking_uri))


def test_runner_hands_the_stage_run_to_the_stage(pipeline_file, tmp_path):
    body = f"""
    name: ctx
    work_dir: {tmp_path / "work"}
    stages:
      probe:
        uses: test_records_mlflow_context
    """
    loaded = load_config(pipeline_file(body))
    report = Runner(loaded, use_ray=False).run()
    stage = report.stage("probe")
    assert stage.manifest["summary"]["data"] == {"run_id": stage.run_id, "tracking_uri": loaded.resolved.tracking_uri()}
    untracked = Runner(loaded, use_ray=False, track=False).run(force=True)
    assert untracked.stage("probe").manifest["summary"]["data"] == {"run_id": None, "tracking_uri": None}
