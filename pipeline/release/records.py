"""What a release is made of, read from the records only: every stage's committed manifest at the
fingerprint the pipeline file gives it now, the summaries in them, the evaluate outputs, the
training run's metrics in MLflow and, for a file with variants, their comparison. Nothing here is
computed again; what is not committed is refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pipeline import manifest as mf
from pipeline import storage as st
from pipeline.config import LoadedConfig
from pipeline.contracts import SummaryRecord
from pipeline.evaluations import VariantComparison, compare_variants, evaluate_rows, evaluate_stage
from pipeline.tracking import MetricPoint, computing_run_metrics

COMPARISON_SIGMAS = 2.0  # as `lmpipe compare`'s default


class ReleaseRefused(RuntimeError):
    """The records cannot make a release (a stage not committed, no export, no training logs)."""


@dataclass(frozen=True)
class StageRecord:
    name: str
    uses: str
    stage_dir: str
    manifest: dict[str, Any]

    @property
    def summary_kind(self) -> Optional[str]:
        summary = self.manifest.get("summary")
        return summary["kind"] if summary else None

    def summary(self) -> dict[str, Any]:
        """The stage's summary, checked against the class its kind names (through the registry,
        which imports every stage and so every summary class)."""
        from pipeline.registry import all_stages

        all_stages()
        return SummaryRecord.model_validate(self.manifest["summary"]).read().model_dump(mode="json")


@dataclass(frozen=True)
class Source:
    """One source of a source stage (ingest), as its manifest recorded it."""

    stage: str
    name: str
    uri: str
    files: list[dict[str, Any]]  # each {"uri", "size", "mtime"/"etag"/"sha256", ...}
    license: Optional[str]
    homepage: Optional[str]

    @property
    def bytes(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.files)

    @property
    def identity(self) -> str:
        return "content" if self.files and all("sha256" in f for f in self.files) else "stat"

    @property
    def digest(self) -> str:
        """The digest of the files' recorded identities (MLflow's dataset digest of the source)."""
        return mf.digest({"files": self.files})


@dataclass(frozen=True)
class TrainingLog:
    stage: str
    run_id: str
    points: list[MetricPoint]


@dataclass(frozen=True)
class ReleaseRecords:
    loaded: LoadedConfig
    storage: st.Storage
    stages: list[StageRecord]  # pipeline order
    sources: list[Source]
    train: Optional[StageRecord]
    training_log: Optional[TrainingLog]
    evaluations: dict[str, list[dict[str, Any]]]  # evaluate stage -> its data rows
    comparison: Optional[VariantComparison]

    def of_kind(self, kind: str) -> list[StageRecord]:
        """The stages whose summary is of this kind (``train``, ``tokenize``, ``dedup``, ...), in pipeline order."""
        return _of_kind(self.stages, kind)


def gather(loaded: LoadedConfig) -> ReleaseRecords:
    """The records of the pipeline as the file describes it now (its base; the variants only for
    their comparison). Refuses, in one line, what a release cannot be made from."""
    from pipeline.runner import Runner

    runner = Runner(loaded, use_ray=False, track=False)
    storage = runner.storage
    stages, missing = [], []
    for name, fp in runner.fingerprints().items():
        stage_dir = mf.stage_uri(runner.work_dir, name, fp.value)
        manifest = mf.read_manifest(storage, stage_dir)  # a damaged one is an error naming the file
        if manifest is None:
            missing.append(f"{name} ({fp.value})")
            continue
        stages.append(StageRecord(name, loaded.declared.stages[name].uses, stage_dir, manifest))
    if missing:
        raise ReleaseRefused(f"{loaded.path}: not committed at this file's config and code: {', '.join(missing)};"
                             f" run `lmpipe run {loaded.path}` first")
    trains = _of_kind(stages, "train")
    if len(trains) > 1:
        raise ReleaseRefused(f"{loaded.path}: a release holds one model; stages {', '.join(s.name for s in trains)} each train one")
    train = trains[0] if trains else None
    if train is not None and not train.summary().get("hf_export"):
        raise ReleaseRefused(f"{loaded.path}: stage {train.name!r} has no Hugging Face export ({train.summary().get('hf_export_error')})")
    evaluations = {s.name: evaluate_rows(storage, s.stage_dir) for s in _of_kind(stages, "evaluate")}
    comparison = None
    if loaded.declared.variants:
        comparison = compare_variants(loaded, evaluate_stage(loaded), COMPARISON_SIGMAS)
        if comparison.missing:
            raise ReleaseRefused(f"{loaded.path}: variants not evaluated yet: {', '.join(comparison.missing)};"
                                 f" run `lmpipe run {loaded.path}` first")
    return ReleaseRecords(loaded, storage, stages, _sources(loaded, stages), train, _training_log(loaded, train), evaluations, comparison)


def _of_kind(stages: list[StageRecord], kind: str) -> list[StageRecord]:
    return [s for s in stages if s.summary_kind == kind]


def _sources(loaded: LoadedConfig, stages: list[StageRecord]) -> list[Source]:
    """The external inputs of the stages that read no other stage (ingest), with the licences the
    file's ``release.sources`` gives them."""
    declared = loaded.declared.release.sources
    found = [(s.name, e) for s in stages if not s.manifest["inputs"] for e in s.manifest["external_inputs"]]
    names = {e["name"] for _, e in found}
    unknown = sorted(set(declared) - names)
    if unknown:
        raise ReleaseRefused(f"{loaded.path}: release.sources.{unknown[0]}: no such source (sources: {', '.join(sorted(names)) or 'none'})")
    return [Source(stage, e["name"], e["uri"], e["files"], declared[e["name"]].license if e["name"] in declared else None,
                   declared[e["name"]].homepage if e["name"] in declared else None) for stage, e in found]


def _training_log(loaded: LoadedConfig, train: Optional[StageRecord]) -> Optional[TrainingLog]:
    if train is None:
        return None
    resolved = loaded.resolved
    try:
        found = computing_run_metrics(resolved.tracking_uri(), resolved.mlflow.experiment, train.manifest["fingerprint"],
                                      train.manifest["attempt"])
    except FileNotFoundError as e:
        raise ReleaseRefused(f"{loaded.path}: the training logs of stage {train.name!r} are in MLflow, and {e}") from None
    if found is None:
        raise ReleaseRefused(f"{loaded.path}: no run in MLflow ({resolved.tracking_uri()}, experiment {resolved.mlflow.experiment!r})"
                             f" computed stage {train.name!r} at fingerprint {train.manifest['fingerprint']}: its training logs"
                             f" cannot be released")
    return TrainingLog(train.name, found[0], found[1])
