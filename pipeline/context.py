"""What a stage sees while it runs: its inputs, its output location, and places to report to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

import pyarrow as pa
from pydantic import ValidationError

from pipeline import manifest as mf
from pipeline import storage as st
from pipeline.contracts import ConsumedDocuments, PartResult, SummaryRecord
from pipeline.dag import InputRef
from pipeline.fanout import FanOut
from pipeline.io import PartOutputs, read_table
from pipeline.stage import StageSummary
from pipeline.tracking import DatasetRef, ModelRecord, RunLogger

S = TypeVar("S", bound=StageSummary)


@dataclass(frozen=True)
class ExternalInput:
    """Data from outside the pipeline (source files): recorded for fingerprints and lineage."""

    name: str
    uri: str
    files: tuple[dict[str, Any], ...]  # each {"uri", "size", "mtime"/"etag"} or {"uri", "size", "sha256"}
    # What identifies a file's version: "stat" (size and mtime/ETag) or "content" (sha256 of its bytes).
    identity: str = "stat"


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

    @property
    def chars(self) -> int:
        """The characters of this dataset's measured column (0: the stage measures none)."""
        return int(self.manifest["datasets"][self.ref.dataset].get("chars") or 0)

    @property
    def summary_kind(self) -> Optional[str]:
        """The kind of summary its stage hands downstream (None: none)."""
        summary = self.manifest.get("summary")
        return summary.get("kind") if summary else None

    def has_dataset(self, dataset: str) -> bool:
        """Whether its stage wrote a dataset of that name (a tokenize stage's validation split)."""
        return dataset in self.manifest["datasets"]

    def files(self) -> list[str]:
        return mf.dataset_files(self.manifest, self.stage_dir, self.ref.dataset)

    def file_sizes(self) -> list[int]:
        """Bytes of each of ``files()``, as the manifest recorded them (0 where it did not)."""
        return [int(f.get("bytes") or 0) for f in self.manifest["datasets"][self.ref.dataset]["files"]]

    def dataset_files(self, dataset: str) -> list[str]:
        """The files of another dataset of the same stage (e.g. a tokenize stage's validation split)."""
        return mf.dataset_files(self.manifest, self.stage_dir, dataset)

    def read_table(self, columns: Optional[list[str]] = None) -> pa.Table:
        return read_table(self.storage, self.files(), columns)

    def summary(self, cls: type[S]) -> S:
        """This input's stage summary, validated as ``cls``."""
        found = _summary_of(self.manifest, cls)
        if found is None:
            raise UpstreamMissing(f"input {self.ref} (stage {self.manifest.get('uses')!r}) has no {cls.kind} summary")
        return found

    def path(self, relative: str) -> str:
        """A file of this stage's output named relative to its folder (as summaries name them)."""
        return st.join(self.stage_dir, relative)


class UpstreamMissing(ValueError):
    """A stage needs what no stage upstream of it produced (a tokenize stage before train)."""


def _summary_of(manifest: dict[str, Any], cls: type[S]) -> Optional[S]:
    summary = manifest.get("summary")
    if not summary or summary.get("kind") != cls.kind:
        return None
    try:
        return SummaryRecord.model_validate(summary).read(cls)
    except (ValidationError, ValueError) as e:
        raise ValueError(f"stage {manifest.get('stage')!r}: {e}") from None


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
    run_parts: Callable[..., list[PartResult]] = field(repr=False, default=None)  # set by the runner
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    part_results: list[PartResult] = field(default_factory=list)
    # A DatasetStage whose outputs are not documents (token sequences, checkpoints) reports the
    # documents it consumed here (the funnel, MLflow); None: the rows of its outputs are the count.
    counts: Optional[ConsumedDocuments] = None
    # The MLflow run of this stage and its tracking URI (None when tracking is off).
    mlflow_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    fan_out: FanOut = field(default=None, repr=False)  # set by the runner
    summary: Optional[StageSummary] = None  # set by the stage (ctx.set_summary)
    _logger: Optional[RunLogger] = field(default=None, repr=False)

    @property
    def attempt_uri(self) -> str:
        return st.join(self.stage_dir, self.attempt)

    # -- what downstream stages need ------------------------------------------------------------
    def set_summary(self, summary: StageSummary) -> None:
        """What this stage hands downstream; the runner checks it is the declared ``Summary``."""
        self.summary = summary

    def upstream(self, cls: type[S]) -> tuple[S, InputDataset]:
        """The nearest stage upstream (breadth first, through any number of stages) whose summary
        is a ``cls``: its validated summary and a handle on its output."""
        queue = list(self.inputs)
        seen: set[str] = set()
        while queue:
            item = queue.pop(0)
            if item.stage_dir in seen:
                continue
            seen.add(item.stage_dir)
            found = _summary_of(item.manifest, cls)
            if found is not None:
                return found, item
            for ref in item.manifest.get("inputs", []):
                manifest = mf.load_manifest(self.storage, ref["stage_dir"])
                if manifest is not None:
                    queue.append(InputDataset(InputRef(ref["stage"], ref["dataset"]), ref["stage_dir"], manifest, self.storage))
        names = ", ".join(str(i.ref) for i in self.inputs) or "none"
        raise UpstreamMissing(f"stage {self.stage_name!r} needs a {cls.kind} stage upstream; none of its inputs ({names}) has one")

    def must_stop(self) -> Optional[str]:
        """Why this stage must stop now (its lease was lost to another run), or None. Work that
        runs outside ``ctx.fan_out`` (a Ray Train run) polls it; ``fan_out`` checks it itself."""
        try:
            self.fan_out.check()
        except Exception as e:  # the runner's check raises what stops the stage (LeaseLost)
            return str(e) or type(e).__name__
        return None

    # -- tracking (all MLflow calls go through pipeline.tracking) ---------------------------------
    @property
    def run_logger(self) -> Optional[RunLogger]:
        """This stage's MLflow run, to hand to workers that log as they go (None: tracking off)."""
        if self._logger is None and self.mlflow_run_id and self.tracking_uri:
            self._logger = RunLogger(self.tracking_uri, self.mlflow_run_id)
        return self._logger

    def log_metric(self, key: str, value: float) -> None:
        """A summary number of the stage: in the manifest and in the stage run's metrics."""
        self.metrics[key] = float(value)

    def log_metrics(self, metrics: dict[str, Optional[float]], step: int = 0, model_id: Optional[str] = None,
                    dataset: Optional[DatasetRef] = None) -> None:
        """Metrics over time (step = training step or tokens seen), optionally linked to a logged
        model and the dataset they were measured on. MLflow only: not in the manifest."""
        logger = self.run_logger
        if logger is not None:
            logger.log_metrics(metrics, step=step, model_id=model_id, dataset=dataset)

    def log_inputs(self, datasets: list[DatasetRef], context: str = "input", model_ids: tuple[str, ...] = ()) -> None:
        logger = self.run_logger
        if logger is not None:
            logger.log_inputs(datasets, context, model_ids)

    def log_model(self, model: ModelRecord) -> Optional[str]:
        """Log a produced model (LoggedModel); returns its id, None when tracking is off."""
        logger = self.run_logger
        return logger.log_model(model) if logger is not None else None

    def log_artifact(self, name: str, data: bytes | str) -> None:
        """Attach a file to the stage's MLflow run (a report, a plot, a tokenizer)."""
        self.artifacts[name] = data.encode() if isinstance(data, str) else data

    def part_outputs(self, part_id: str, max_rows_per_file: int = 50_000, formats: Optional[dict[str, str]] = None,
                     measure_column: Optional[str] = "text") -> PartOutputs:
        """For DatasetStage: write rows of one output part on the driver (small outputs)."""
        return PartOutputs(self.storage, self.attempt_uri, self.attempt, part_id, max_rows_per_file, measure_column, dict(formats or {}))

    def add_part_result(self, result: PartResult) -> None:
        """A part written on the driver (``ctx.part_outputs(...).close()``), counted with the rest."""
        self.part_results.append(PartResult.checked(result, self.stage_name))

    def set_counts(self, rows_in: int, kept: int, rejected: Optional[dict[str, int]] = None) -> None:
        """For a stage whose outputs are not documents: the documents it read, kept and rejected."""
        self.counts = ConsumedDocuments(rows_in=int(rows_in), kept=int(kept), rejected={r: int(n) for r, n in (rejected or {}).items()})
