"""MLflow lineage: one run per pipeline invocation, one nested run per stage.

Each stage run carries its config (params), fingerprint/version/code version/cached (tags),
counts and timings (metrics), the datasets it read and wrote (``log_inputs`` with context
``input``/``output``; digest = the producing stage's fingerprint; source = the data's URI) and
its manifest as an artifact. Only the *declared* config is logged, so ``${SECRET}`` references
stay references.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, wraps
from typing import Any, Optional

from pipeline import manifest as mf
from pipeline import storage as st
from pipeline.locks import process_gone

log = logging.getLogger("lmpipe")

MAX_PARAM_LEN = 6000

# MLflow's HTTP client waits 120 s per request and retries 7 times with backoff: a tracking server
# that died kept a run waiting 12 minutes. These bounds (a user's own settings win) make a dead
# server known in seconds (refused connections) and a hung one in about a minute and a half.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
HEALTH_TIMEOUT_S = 5.0


def bound_http_requests() -> None:
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def server_not_answering(tracking_uri: str) -> Optional[str]:
    """Why an http(s) tracking server does not answer (None: it answers, or the store is not a
    server). Any HTTP answer counts as answering: the error was then something else."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except Exception as e:
        reason = getattr(e, "reason", e)
        return getattr(reason, "strerror", None) or str(reason) or type(e).__name__


OFFLINE_ADVICE = ("this run goes on without recording to MLflow; its outputs are committed as usual -- run the same"
                  " command again when the server is back to record them (every finished stage is then cached)")


def _recording(what: str):
    """A Tracker method that records to MLflow: if the tracking server stops answering, the run
    goes on without it (one warning naming the server) instead of failing or waiting; any other
    error is raised as before."""
    def wrap(method):
        @wraps(method)
        def guarded(self, *args, **kwargs):
            if self.offline is not None:
                return None
            try:
                return method(self, *args, **kwargs)
            except Exception:
                why = server_not_answering(self.tracking_uri)
                if why is None:
                    raise
                self.offline = f"the MLflow tracking server at {self.tracking_uri} stopped answering ({why})"
                log.warning("%s while recording %s: %s", self.offline, what, OFFLINE_ADVICE)
                return None
        return guarded
    return wrap


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = "{}"
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            out[prefix] = json.dumps(obj)
        else:
            for i, v in enumerate(obj):
                out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = "null" if obj is None else str(obj)
    return {k: (v if len(v) <= MAX_PARAM_LEN else v[: MAX_PARAM_LEN - 3] + "...") for k, v in out.items()}


@lru_cache(maxsize=1)
@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The lmpipe code that ran: git commit (+dirty) of the checkout, else the package version.
    Once per process (two git commands; a run asks for it at every stage): the code a process
    runs is what it imported, whatever is edited on disk meanwhile."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
            return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lmpipe=={version('lmpipe')}"
    except PackageNotFoundError:
        return "unknown"


def metric_key(text: str) -> str:
    """The one rule for metric names: MLflow accepts letters, digits, ``_ - . / :`` and spaces."""
    return "".join(ch if ch.isalnum() or ch in "_-./ :" else "_" for ch in text)


def stage_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    counts = manifest["counts"]
    metrics: dict[str, float] = {
        "rows_in": counts["rows_in"],
        "rows_out": counts["kept"],
        "kept": counts["kept"],
        "rejected": sum(counts["rejected"].values()),
        "quarantined": sum(counts["quarantined"].values()),
        "bytes_in": manifest.get("bytes_in", 0),
        "wall_seconds": manifest["timings"]["wall_seconds"],
        "rows_per_second": manifest["timings"].get("rows_per_second", 0.0),
        "parts": manifest.get("parts", 0),
    }
    for reason, n in counts["rejected"].items():
        metrics[metric_key(f"rejected.{reason}")] = n
    for reason, n in counts["quarantined"].items():
        metrics[metric_key(f"quarantined.{reason}")] = n
    for ds, info in manifest["datasets"].items():
        metrics[metric_key(f"{ds}.rows")] = info["rows"]
        metrics[metric_key(f"{ds}.bytes")] = info["bytes"]
        if "chars" in info:
            metrics[metric_key(f"{ds}.chars")] = info["chars"]
    for key, value in manifest.get("metrics", {}).items():
        if isinstance(value, (int, float)):
            metrics[metric_key(key)] = value
    return metrics


@contextmanager
def _embedded_store_lock(tracking_uri: str):
    """For a sqlite store: an exclusive lock beside it while MLflow creates or migrates its schema
    (two first runs at once raced: "Online migration expected to match one row"), and a store
    whose creation never finished moved aside first. Other stores: nothing to do."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = tracking_uri[len("sqlite:///") :]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _move_aside_if_half_created(path)
            if not os.path.exists(path):
                _copy_empty_store(path)
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _copy_empty_store(path: str) -> None:
    """A new sqlite store starts as a copy of an empty one that this MLflow created once (kept in
    ``$LMPIPE_HOME/mlflow-stores``, one per MLflow version and schema revision): MLflow creates a
    store by replaying every schema migration, 2-3 CPU-seconds -- more than the rest of a small
    run's start-up, in every new work_dir. Where anything goes wrong, MLflow creates the store
    itself, as before."""
    import shutil
    import sqlite3

    import mlflow

    _, head = _complete_schema()
    if head is None:
        return
    from pipeline.config import lmpipe_home

    folder = os.path.join(lmpipe_home(), "mlflow-stores")
    template = os.path.join(folder, f"empty-{mlflow.__version__}-{head}.db")
    part = f"{path}.part-{os.getpid()}"
    try:
        if not os.path.exists(template):
            os.makedirs(folder, exist_ok=True)
            fresh = f"{template}.part-{os.getpid()}"
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments()
            os.replace(fresh, template)  # atomic: a process that copies it sees a whole store or none
        shutil.copyfile(template, part)
        with sqlite3.connect(part) as db:  # the Default experiment as MLflow makes it here and now
            now = int(time.time() * 1000)
            db.execute("update experiments set artifact_location = ?, creation_time = ?, last_update_time = ? where experiment_id = 0",
                       (_default_artifact_location(), now, now))
        os.replace(part, path)
    except Exception as e:  # a full disk, an unwritable home: MLflow's own creation follows
        log.debug("no copy of an empty MLflow store for %s (%s); MLflow creates it", path, e)
        for leftover in (part, f"{template}.part-{os.getpid()}"):
            if os.path.exists(leftover):
                os.remove(leftover)


def _default_artifact_location() -> str:
    """Where MLflow puts the Default experiment's artifacts in a store it creates in this process."""
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.utils.uri import append_to_uri_path, resolve_uri_if_local

    return append_to_uri_path(resolve_uri_if_local(DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH), "0")


def _complete_schema() -> tuple[Optional[set[str]], Optional[str]]:
    """The tables and the alembic revision of a finished store of this MLflow (None where this
    MLflow does not say): what a half-created store is told apart by."""
    try:
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401  (defines the registry's tables)
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (defines the tracking tables)
        from mlflow.store.db.base_sql_model import Base
        from mlflow.store.db.utils import _get_latest_schema_revision
    except ImportError:  # another MLflow layout: fall back to the leftovers and the version row
        return None, None
    try:
        head = _get_latest_schema_revision()
    except Exception:
        head = None
    return set(Base.metadata.tables), head


def _move_aside_if_half_created(path: str) -> None:
    """A first run stopped while MLflow created the store (a full disk) leaves part of the schema:
    alembic's temporary tables, or tables of a migration that stopped half-way with the version
    row of the one before -- and every later run fails ("table _alembic_tmp_... already exists",
    "table secrets already exists"), because MLflow finds tables missing and replays migrations
    over what is there. Such a store is recognised by its tables and revision, not by the
    version row alone: one that holds no runs is moved aside (kept, not deleted) and created
    anew; one that holds runs is left alone with an error that says what to do."""
    import sqlite3

    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type = 'table'")}
        leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
        version = db.execute("select version_num from alembic_version").fetchone() if "alembic_version" in tables else None
        runs = db.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
    expected, head = _complete_schema()
    missing = sorted(expected - tables) if expected is not None else []
    behind = head is not None and version is not None and version[0] != head
    if version is not None and not leftovers and not missing and not behind:
        return
    if runs:
        if not leftovers and not missing:  # a finished store of an older MLflow: MLflow says to upgrade it
            return
        raise RuntimeError(f"MLflow store {path} holds {runs} runs but an interrupted schema migration left"
                           f" {leftovers or ('missing tables ' + ', '.join(missing[:5]))};"
                           f" back it up, then drop the tables {leftovers} and run again (MLflow redoes the migration)")
    what = (", ".join(leftovers) if leftovers else "no schema version" if version is None
            else f"{len(missing)} of {len(expected or ())} tables missing at revision {version[0]}" if missing
            else f"revision {version[0]}, not {head}")
    aside = f"{path}.incomplete-{time.strftime('%Y%m%dT%H%M%S')}"
    os.replace(path, aside)
    log.warning("MLflow store %s was left half-created by an earlier run (%s); moved it aside to %s and creating a new one",
                path, what, aside)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's value for model training experiments (not "genai_development")


class Tracker:
    """Records a pipeline run and its stage runs in MLflow (tracking URI given explicitly)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: Optional[str] = None):
        import mlflow
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.offline: Optional[str] = None  # why recording stopped: the tracking server stopped answering
        bound_http_requests()
        with _embedded_store_lock(tracking_uri):  # the first use creates the schema: one process at a time
            self.client = MlflowClient(tracking_uri=tracking_uri)
            mlflow.set_tracking_uri(tracking_uri)  # artifact repositories resolve through it
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            else:
                self.experiment_id = exp.experiment_id
            if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:
                # MLflow 3's UI opens an experiment without this tag in its GenAI (traces) view; a
                # pipeline's runs, metrics and models belong in the model-development view
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.parent_id: Optional[str] = None

    # -- pipeline run ---------------------------------------------------------------------
    @_recording("the pipeline run")
    def start_pipeline(self, name: str, config_path: str, config_text: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        self.close_dead_runs()
        all_tags = {
            "lmpipe.kind": "pipeline",
            "lmpipe.pipeline": name,
            "lmpipe.config_path": config_path,
            "lmpipe.code_version": code_version(),
            "lmpipe.host": socket.gethostname(),
            "lmpipe.pid": str(os.getpid()),
            **tags,
        }
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, flatten(params))
        self.client.log_text(self.parent_id, config_text, os.path.basename(config_path) or "pipeline.yaml")
        return self.parent_id

    def close_dead_runs(self) -> list[str]:
        """Mark KILLED the pipeline runs (and their stage runs) left RUNNING by a driver on this host
        that no longer exists (killed, crashed, machine rebooted); then the ablation runs of such
        drivers (their variants' pipeline runs are closed by then)."""
        host = socket.gethostname()
        closed = []
        runs = [run for kind in ("pipeline", "ablation") for run in self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`lmpipe.kind` = '{kind}' and attributes.status = 'RUNNING' and tags.`lmpipe.host` = '{host}'"
        )]
        for run in runs:
            pid = run.data.tags.get("lmpipe.pid")
            if not process_gone(run.data.tags.get("lmpipe.host"), pid):
                continue
            children = self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'")
            for child in children:
                self.client.set_tag(child.info.run_id, "lmpipe.error", f"driver process {pid} on {host} died while this stage ran")
                self.client.set_terminated(child.info.run_id, status="KILLED")
            self.client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
        return closed

    @_recording("the end of the pipeline run")
    def end_pipeline(self, status: str, summary: Optional[dict[str, Any]] = None, artifacts: Optional[dict[str, bytes]] = None,
                     tags: Optional[dict[str, str]] = None) -> None:
        if self.parent_id is None:
            return
        if summary:
            self.client.log_dict(self.parent_id, summary, "pipeline_summary.json")
        for key, value in (tags or {}).items():
            self.client.set_tag(self.parent_id, key, value)
        if artifacts:
            self._log_artifact_bytes(self.parent_id, artifacts)
        self.client.set_terminated(self.parent_id, status=status)

    # -- ablation run: the parent of its variants' pipeline runs -------------------------------
    @_recording("the ablation run")
    def start_ablation(self, name: str, config_path: str, config_text: str, variants: dict[str, dict[str, Any]],
                       tags: dict[str, str]) -> str:
        """The run whose children are the pipeline runs of the variants (``variants``: name -> overrides)."""
        all_tags = {"lmpipe.kind": "ablation", "lmpipe.pipeline": name, "lmpipe.config_path": config_path,
                    "lmpipe.code_version": code_version(), "lmpipe.host": socket.gethostname(), "lmpipe.pid": str(os.getpid()),
                    "lmpipe.variants": ",".join(variants), **tags}
        run = self.client.create_run(self.experiment_id, run_name=f"{name} ablation", tags=all_tags)
        self._log_params(run.info.run_id, flatten({"variants": variants}) if any(variants.values()) else {})
        self.client.log_text(run.info.run_id, config_text, os.path.basename(config_path) or "pipeline.yaml")
        return run.info.run_id

    @staticmethod
    def variant_tags(ablation_run_id: Optional[str], variant: str, overrides: dict[str, Any]) -> dict[str, str]:
        """The tags that make a pipeline run one variant of an ablation run (its child in MLflow)."""
        tags = {"lmpipe.variant": variant, "lmpipe.variant_overrides": json.dumps(overrides, sort_keys=True)[:MAX_PARAM_LEN]}
        if ablation_run_id:
            tags["mlflow.parentRunId"] = ablation_run_id
        return tags

    @_recording("the end of the ablation run")
    def end_ablation(self, run_id: Optional[str], status: str, summary: dict[str, Any]) -> None:
        if run_id is None:
            return
        self.client.log_dict(run_id, summary, "ablation_summary.json")
        self.client.set_terminated(run_id, status=status)

    @_recording("artifacts")
    def log_artifacts(self, run_id: str, artifacts: dict[str, bytes]) -> None:
        self._log_artifact_bytes(run_id, artifacts)

    def latest_ablation_run(self, name: str, config_path: str) -> Optional[str]:
        """The newest ablation run of this pipeline file (where ``lmpipe compare`` logs its artifacts)."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`lmpipe.kind` = 'ablation' and tags.`lmpipe.pipeline` = '{name}'",
                                       order_by=["attributes.start_time DESC"], max_results=20)
        runs = [r for r in runs if r.data.tags.get("lmpipe.config_path") == config_path]
        return runs[0].info.run_id if runs else None

    def _log_artifact_bytes(self, run_id: str, artifacts: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in artifacts.items():
                path = os.path.join(tmp, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            self.client.log_artifacts(run_id, tmp)

    # -- stage runs -----------------------------------------------------------------------
    @_recording("a stage run")
    def start_stage(self, stage: str, uses: str, version: str, fingerprint: str, cached: bool, config: dict[str, Any], ray_address: str) -> str:
        tags = {
            "mlflow.parentRunId": self.parent_id or "",
            "lmpipe.kind": "stage",
            "lmpipe.stage": stage,
            "lmpipe.uses": uses,
            "lmpipe.stage_version": version,
            "lmpipe.fingerprint": fingerprint,
            "lmpipe.cached": "true" if cached else "false",
            "lmpipe.code_version": code_version(),
            "lmpipe.ray_address": ray_address,
        }
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        params = flatten(config, "config")
        params.update({"stage.uses": uses, "stage.version": version})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    @_recording("a finished stage")
    def finish_stage(
        self,
        run_id: str,
        manifest: dict[str, Any],
        stage_dir: str,
        input_refs: list[dict[str, Any]],
        artifacts: dict[str, bytes],
    ) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in stage_metrics(manifest).items()]
        tags = [RunTag("lmpipe.output_uri", stage_dir), RunTag("lmpipe.attempt", manifest["attempt"])]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self._log_datasets(run_id, manifest, stage_dir, input_refs)
        self.client.log_dict(run_id, manifest, "manifest.json")
        if artifacts:
            self._log_artifact_bytes(run_id, artifacts)
        self.client.set_terminated(run_id, status="FINISHED")

    @_recording("a failed stage")
    def fail_stage(self, run_id: str, error: str) -> None:
        self.client.set_tag(run_id, "lmpipe.error", error[:5000])
        self.client.set_terminated(run_id, status="FAILED")

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _log_datasets(self, run_id: str, manifest: dict[str, Any], stage_dir: str, input_refs: list[dict[str, Any]]) -> None:
        make = _dataset_input

        inputs = []
        for ext in manifest.get("external_inputs", []):
            digest = mf.digest({"files": ext["files"]})
            inputs.append(make(f"source:{ext['name']}", ext["uri"], digest, "input"))
        for ref in input_refs:
            inputs.append(make(ref["ref"], ref["uri"], ref["fingerprint"], "input"))
        for ds_name in manifest["datasets"]:
            uri = st.join(stage_dir, manifest["attempt"], ds_name)
            inputs.append(make(f"{manifest['stage']}.{ds_name}", uri, manifest["fingerprint"], "output"))
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)


# -- what stages record while they run (through their context) ------------------------------------

@dataclass(frozen=True)
class DatasetRef:
    """A dataset a stage read, for MLflow's Datasets panel: name, where it is, a content digest."""

    name: str
    uri: str
    digest: str


@dataclass(frozen=True)
class ModelRecord:
    """A model a stage produced, logged as an MLflow LoggedModel of the stage run."""

    name: str
    local_dir: str  # its files (e.g. a Hugging Face export), uploaded as the model's artifacts
    model_type: str
    step: int
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # logged against the model and ``dataset``
    dataset: Optional[DatasetRef] = None


class RunLogger:
    """Logs to one MLflow run: metrics by step (optionally linked to a model and a dataset),
    input datasets and models, and LoggedModels. Holds only the tracking URI and run id, so it
    pickles to Ray workers (a training rank logs its per-step metrics with it); the client is
    made where it is used."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None
        self.offline: Optional[str] = None  # the tracking server stopped answering: metrics are dropped

    def __getstate__(self):
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None, "offline": None}

    @property
    def _mlflow(self):
        """The raw client, made where it is used and never handed out: callers log through the
        methods below, so MLflow stays behind this module."""
        if self._client is None:
            from mlflow import MlflowClient

            bound_http_requests()  # in a Ray worker too (a training rank logs its steps)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """The training loop's sink: every finite metric at ``step``."""
        self.log_metrics(metrics, step=step)

    @_recording("metrics")
    def log_metrics(self, metrics: dict[str, Optional[float]], step: int = 0, model_id: Optional[str] = None,
                    dataset: Optional[DatasetRef] = None) -> None:
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = {metric_key(k): float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if model_id or dataset:  # linked metrics: one call each (log_batch has no model or dataset fields)
            for key, value in finite.items():
                self._mlflow.log_metric(self.run_id, key, value, timestamp=now, step=step, model_id=model_id,
                                       dataset_name=dataset.name if dataset else None,
                                       dataset_digest=dataset.digest[:36] if dataset else None)
            return
        items = [Metric(k, v, now, step) for k, v in finite.items()]
        for i in range(0, len(items), 1000):
            self._mlflow.log_batch(self.run_id, metrics=items[i : i + 1000])

    @_recording("input datasets")
    def log_inputs(self, datasets: list[DatasetRef], context: str = "input", model_ids: tuple[str, ...] = ()) -> None:
        """Datasets (with their digests) and models the stage read. A model id from another
        tracking server cannot be linked: the datasets are still logged."""
        from mlflow.entities import LoggedModelInput

        entities = [_dataset_input(d.name, d.uri, d.digest, context) for d in datasets]
        models = [LoggedModelInput(m) for m in model_ids]
        try:
            self._mlflow.log_inputs(self.run_id, datasets=entities or None, models=models or None)
        except Exception as e:
            if not models:
                raise
            log.warning("could not link model(s) %s in MLflow: %s", list(model_ids), e)
            if entities:
                self._mlflow.log_inputs(self.run_id, datasets=entities)

    @_recording("a model")
    def log_model(self, model: ModelRecord) -> Optional[str]:
        """A LoggedModel of this run with its files, metrics linked to it, and READY; returns its id."""
        from mlflow.entities import LoggedModelOutput

        run = self._mlflow.get_run(self.run_id)
        logged = self._mlflow.create_logged_model(run.info.experiment_id, name=model.name, source_run_id=self.run_id,
                                                 model_type=model.model_type, params=dict(model.params), tags=dict(model.tags))
        self._mlflow.log_model_artifacts(logged.model_id, model.local_dir)
        if model.metrics:
            self.log_metrics(model.metrics, step=model.step, model_id=logged.model_id, dataset=model.dataset)
        self._mlflow.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, model.step)])
        self._mlflow.finalize_logged_model(logged.model_id, "READY")
        return logged.model_id


def _dataset_input(name: str, uri: str, digest: str, context: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)
    ds = MetaDataset(source=source, name=name[:500], digest=digest[:36])
    return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


# -- reading runs back (the CLI's status, lineage and eval-table) -----------------------------------

def stage_output_of_run(tracking_uri: str, run_id: str, uses: Optional[str] = None) -> str:
    """The output folder of a stage run; for a pipeline run, of its latest finished stage run
    (of stage type ``uses``, when given)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=existing_store(tracking_uri))
    run = client.get_run(run_id)
    tags = run.data.tags
    if tags.get("lmpipe.kind") == "pipeline":
        children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                                      order_by=["attributes.start_time DESC"])
        children = [c for c in children if c.data.tags.get("lmpipe.output_uri") and (uses is None or c.data.tags.get("lmpipe.uses") == uses)]
        if not children:
            what = f"finished {uses} stage" if uses else "finished stage runs"
            raise LookupError(f"pipeline run {run_id} has no {what}")
        return children[0].data.tags["lmpipe.output_uri"]
    if "lmpipe.output_uri" not in tags:
        raise LookupError(f"run {run_id} is not a finished lmpipe stage run (no lmpipe.output_uri tag)")
    return tags["lmpipe.output_uri"]


@dataclass(frozen=True)
class StageRunInfo:
    stage: str
    status: str
    cached: bool
    fingerprint: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class PipelineRunInfo:
    run_id: str
    pipeline: str
    status: str  # RUNNING of a driver that is gone from this host reads "KILLED (driver gone)"
    start_time_ms: int
    stages: list[StageRunInfo]


def recent_pipeline_runs(tracking_uri: str, limit: int) -> list[PipelineRunInfo]:
    """The latest pipeline runs of every experiment in the store, newest first, with their stages."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=existing_store(tracking_uri))
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string="tags.`lmpipe.kind` = 'pipeline'", order_by=["attributes.start_time DESC"], max_results=limit)
    out = []
    for run in runs:
        children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                                      order_by=["attributes.start_time ASC"])
        stages = [StageRunInfo(c.data.tags.get("lmpipe.stage", c.info.run_name), c.info.status, c.data.tags.get("lmpipe.cached") == "true",
                               c.data.tags.get("lmpipe.fingerprint", ""), dict(c.data.metrics)) for c in children]
        out.append(PipelineRunInfo(run.info.run_id, run.data.tags.get("lmpipe.pipeline", run.info.run_name), _live_status(run),
                                   run.info.start_time, stages))
    return out


def _live_status(run) -> str:
    """A run still marked RUNNING whose driver was on this host and is gone was killed (the next
    ``lmpipe run`` marks it so in the store; ``status`` should not wait for that)."""
    tags = run.data.tags
    if run.info.status == "RUNNING" and process_gone(tags.get("lmpipe.host"), tags.get("lmpipe.pid")):
        return f"KILLED (driver pid {tags['lmpipe.pid']} is gone)"
    return run.info.status


def existing_store(tracking_uri: str) -> str:
    """The URI, if it names a store that exists (and answers); reading commands must not create an
    empty one, nor wait minutes on a server that is not there."""
    from pipeline.preflight import check_tracking_uri

    check_tracking_uri(tracking_uri)
    bound_http_requests()
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///") :]
        if not os.path.exists(path):
            raise FileNotFoundError(f"no MLflow store at {path} (tracking URI {tracking_uri}): nothing has run with it yet,"
                                    " or the path is mistyped")
    return tracking_uri


@dataclass(frozen=True)
class MetricPoint:
    """One logged value of a metric, as the store holds it."""

    key: str
    step: int
    timestamp_ms: int
    value: float


def computing_run_metrics(tracking_uri: str, experiment: str, fingerprint: str, attempt: str) -> Optional[tuple[str, list[MetricPoint]]]:
    """(run id, every logged value of every metric, ordered by key, step, time) of the stage run
    that computed the committed ``attempt`` of the output ``fingerprint`` -- not a later run that
    found it cached; None when the store holds no such run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=existing_store(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`lmpipe.fingerprint` = '{fingerprint}' and tags.`lmpipe.attempt` = '{attempt}'"
                                                                 " and tags.`lmpipe.cached` = 'false'",
                              order_by=["attributes.start_time ASC"], max_results=5)
    if not runs:
        return None
    run = runs[0]
    points = [MetricPoint(m.key, int(m.step), int(m.timestamp), float(m.value))
              for key in sorted(run.data.metrics) for m in client.get_metric_history(run.info.run_id, key)]
    return run.info.run_id, sorted(points, key=lambda p: (p.key, p.step, p.timestamp_ms, p.value))
