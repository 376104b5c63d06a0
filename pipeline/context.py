"""What a stage sees while it runs: its inputs, its output location, and places to report to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pyarrow as pa

from pipeline import manifest as mf
from pipeline import storage as st
from pipeline.dag import InputRef
from pipeline.io import PartOutputs, read_table


@dataclass(frozen=True)
class ExternalInput:
    """Data from outside the pipeline (source files): recorded for fingerprints and lineage."""

    name: str
    uri: str
    files: tuple[dict[str, Any], ...]  # each {"uri", "size", "mtime"/"etag"}


@dataclass
class InputDataset:
    """One upstream dataset, as committed by its manifest."""

    ref: InputRef
    stage_dir: str
    manifest: dict[str, Any]
    storage: st.Storage

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def uri(self) -> str:
        return mf.dataset_uri(self.manifest, self.stage_dir, self.ref.dataset)

    @property
    def num_rows(self) -> int:
        return int(self.manifest["datasets"][self.ref.dataset]["rows"])

    def files(self) -> list[str]:
        return mf.dataset_files(self.manifest, self.stage_dir, self.ref.dataset)

    def read_table(self, columns: Optional[list[str]] = None) -> pa.Table:
        return read_table(self.storage, self.files(), columns)

    def ray_dataset(self, columns: Optional[list[str]] = None):
        """A Ray Dataset over the committed files (streaming, never collected on the driver)."""
        import ray.data

        files = self.files()
        fs = None
        if files and st.is_remote(files[0]):
            fs, _ = self.storage.arrow_fs(files[0])
            files = [f.split("://", 1)[1] for f in files]
        return ray.data.read_parquet(files, filesystem=fs, columns=columns, override_num_blocks=max(1, len(files)))


@dataclass
class PartContext:
    """Worker-side context of one part."""

    stage_name: str
    seed: int
    storage: st.Storage
    outputs: PartOutputs

    def count(self, name: str, value: float = 1) -> None:
        self.outputs.count(name, value)


@dataclass
class StageContext:
    """Driver-side context of one stage run."""

    pipeline_name: str
    stage_name: str
    fingerprint: str
    seed: int
    storage: st.Storage
    work_dir: str
    stage_dir: str
    attempt: str
    inputs: list[InputDataset]
    resources: Any
    run_parts: Callable[..., list[dict[str, Any]]] = field(repr=False, default=None)  # set by the runner
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    part_results: list[dict[str, Any]] = field(default_factory=list)
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    # A DatasetStage whose outputs are not documents (token sequences, checkpoints) reports the
    # documents it consumed here: {"rows_in": n, "kept": k, "rejected": {reason: n}} (funnel, MLflow).
    counts: dict[str, Any] = field(default_factory=dict)
    # The MLflow run of this stage and its tracking URI (None when tracking is off), for stages
    # whose workers log as they go (per-step training metrics from rank 0).
    mlflow_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None

    @property
    def attempt_uri(self) -> str:
        return st.join(self.stage_dir, self.attempt)

    def log_metric(self, key: str, value: float) -> None:
        self.metrics[key] = float(value)

    def log_artifact(self, name: str, data: bytes | str) -> None:
        """Attach a file to the stage's MLflow run (a report, a plot, a tokenizer)."""
        self.artifacts[name] = data.encode() if isinstance(data, str) else data

    def part_outputs(self, part_id: str, max_rows_per_file: int = 50_000, formats: Optional[dict[str, str]] = None,
                     measure_column: Optional[str] = "text") -> PartOutputs:
        """For DatasetStage: write rows of one output part on the driver (small outputs)."""
        return PartOutputs(self.storage, self.attempt_uri, self.attempt, part_id, max_rows_per_file, measure_column, dict(formats or {}))

    def add_part_result(self, result: dict[str, Any]) -> None:
        self.part_results.append(result)
