"""Run a pipeline: resolve the DAG, fingerprint, skip what is cached, run the rest on Ray,
commit outputs atomically and record everything in MLflow."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline import console, local_ray
from pipeline.resources import ResourcesUnavailable, StageFailed, check_resources  # noqa: F401 (ResourcesUnavailable: re-exported)
from pipeline import manifest as mf
from pipeline import preflight
from pipeline import storage as st
from pipeline.code_digest import DIGEST_SCOPE, combined as combined_digest, library_versions
from pipeline.config import ConfigError, LoadedConfig
from pipeline.context import InputDataset, StageContext
from pipeline.contracts import (Counts, DatasetEntry, ExternalInputEntry, InputEntry, Manifest, MergedParts, PartResult, SummaryRecord,
                                Timings)
from pipeline.dag import Node, build_dag, downstream_of, upstream_of
from pipeline.funnel import funnel_artifacts
from pipeline.locks import ReaderLease, StageLock, describe, live_readers, process_gone
from pipeline.fanout import FanOut
from pipeline.execute import PartJob, merge_results, run_parts
from pipeline.stage import DatasetStage, Resources, RowStage, SourceStage, Part, stage_seed
from pipeline.tracking import Tracker, code_version
from pipeline.types import fingerprinted_config

log = logging.getLogger("lmpipe")


RAY_NOT_STARTED = "not started (every stage cached so far)"


def check_cluster_resources(stage_name: str, resources: Resources, cluster: dict[str, float]) -> None:
    """Fail at once, with what is missing, instead of waiting forever for resources that do not exist."""
    check_resources(stage_name, {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.custom}, cluster)


class CountsMismatch(StageFailed):
    pass


class CheckFailed(StageFailed, ValueError):
    """A stage's own acceptance rule refused its output (bad input beyond what it accepts)."""


@dataclass(frozen=True)
class Fingerprint:
    """A stage's fingerprint and what it was computed from."""

    value: str
    payload: dict[str, Any]  # mf.fingerprint_payload: version, code digest, libraries, config, inputs, extras, seed
    code_files: dict[str, str]  # file -> digest of the stage's code (pipeline.code_digest)
    externals: list  # ExternalInput


@dataclass
class StageReport:
    name: str
    fingerprint: str
    cached: bool
    stage_dir: str
    manifest: dict[str, Any]
    run_id: Optional[str] = None


@dataclass
class RunReport:
    pipeline_run_id: Optional[str]
    stages: list[StageReport] = field(default_factory=list)

    def stage(self, name: str) -> StageReport:
        return next(s for s in self.stages if s.name == name)


def effective_resources(node: Node, loaded: LoadedConfig) -> Resources:
    base = node.cls.resources
    over = loaded.resolved.stages[node.name].resources
    return Resources(
        num_cpus=base.num_cpus if over.num_cpus is None else over.num_cpus,
        num_gpus=base.num_gpus if over.num_gpus is None else over.num_gpus,
        actors=base.actors,
        batch_size=over.batch_size or base.batch_size,
        max_workers=over.max_workers or base.max_workers,
        custom={**base.custom, **over.custom},
    )


def init_ray(loaded: LoadedConfig, address: Optional[str]) -> str:
    """Connect to (or start) Ray; returns a description of the address used."""
    import ray

    if not ray.is_initialized():
        cfg = loaded.resolved.ray
        address = address or cfg.address or os.environ.get("LMPIPE_RAY_ADDRESS")
        marked = False  # whether workers mark lmpipe's log lines (pipeline/console.py)
        if address in (None, "", "local"):
            kwargs: dict[str, Any] = dict(include_dashboard=cfg.include_dashboard, log_to_driver=True)
            if cfg.num_cpus:
                kwargs["num_cpus"] = cfg.num_cpus
            if cfg.object_store_memory:
                kwargs["object_store_memory"] = cfg.object_store_memory
            if console.is_active():
                kwargs["runtime_env"] = {"worker_process_setup_hook": "pipeline.console.setup_worker_logging"}
                marked = True
            info = local_ray.start(**kwargs)  # on 127.0.0.1: a run's own Ray is never joined from the network
        else:
            preflight.check_ray_address(address)
            info = ray.init(address=address, log_to_driver=True)
        console.route_ray_output(marked_workers=marked)
        dashboard = getattr(info, "dashboard_url", None)
        log.info("Ray at %s%s", ray.get_runtime_context().gcs_address, f", dashboard http://{dashboard}" if dashboard else "")
    return ray.get_runtime_context().gcs_address


def largest_first(parts: list[Part]) -> list[Part]:
    """The order a stage's parts start in: largest first (longest-processing-time first, so the
    stage's wall time is not one large part run alone after the small ones), ties and unknown
    sizes in part order. Only the order of work changes: results come back in part order."""
    return sorted(parts, key=lambda p: -p.size)


class Runner:
    def __init__(self, loaded: LoadedConfig, address: Optional[str] = None, use_ray: bool = True, track: bool = True):
        self.loaded = loaded
        self.address = address
        self.use_ray = use_ray
        self.storage = loaded.storage
        self.order = build_dag(loaded)
        self.by_name = {n.name: n for n in self.order}
        self.work_dir = loaded.resolved.work_dir
        if track:
            log.info("%s", loaded.resolved.describe_tracking())
        self._check_addresses(track)  # fail in seconds, naming the address, where a client would retry for minutes
        # The MLflow store opens (imports, schema checks: seconds) in a thread while the run
        # fingerprints its stages and starts Ray, which mostly waits for its processes: start-up
        # costs the longer of the two, not their sum. Its error, if any, is raised where the
        # tracker is first used.
        self._tracker: Optional[Future] = None
        if track:
            resolved = loaded.resolved
            opener = ThreadPoolExecutor(1, thread_name_prefix="lmpipe-mlflow")
            self._tracker = opener.submit(Tracker, resolved.tracking_uri(), resolved.mlflow.experiment, resolved.artifact_location())
            opener.shutdown(wait=False)  # the thread ends with its one task
        self.ray_address = RAY_NOT_STARTED if use_ray else "none (in-process)"
        self._reader_lease: Optional[ReaderLease] = None  # this run's, while it runs

    @property
    def tracker(self) -> Optional[Tracker]:
        """The run's MLflow tracker (None: tracking off), once its store is open."""
        return None if self._tracker is None else self._tracker.result()

    def _check_addresses(self, track: bool) -> None:
        resolved = self.loaded.resolved
        ray_address = self.address or resolved.ray.address or os.environ.get("LMPIPE_RAY_ADDRESS")
        if self.use_ray and ray_address not in (None, "", "local"):  # before the MLflow store is opened
            preflight.check_ray_address(ray_address)
        if track:
            preflight.check_tracking_uri(resolved.tracking_uri())
        uses_s3 = st.is_remote(self.work_dir) or "s3://" in json.dumps(
            {name: cfg.model_dump(mode="json") for name, cfg in self.loaded.resolved_stage_configs.items()})
        if uses_s3:
            preflight.check_s3_endpoint(resolved.storage.s3.endpoint_url)
        bucket = self.storage.missing_bucket(self.work_dir)
        if bucket is not None:
            raise FileNotFoundError(f"work_dir {self.work_dir}: the bucket {bucket!r} does not exist"
                                    f"{' at ' + resolved.storage.s3.endpoint_url if resolved.storage.s3.endpoint_url else ''};"
                                    f" create it or fix work_dir")

    # -- planning ---------------------------------------------------------------------------
    def _context(self, node: Node, fingerprint: str, input_datasets: list[InputDataset]) -> StageContext:
        return StageContext(
            pipeline_name=self.loaded.resolved.name,
            stage_name=node.name,
            fingerprint=fingerprint,
            seed=stage_seed(self.loaded.resolved.seed, node.name),
            storage=self.storage,
            work_dir=self.work_dir,
            stage_dir=mf.stage_uri(self.work_dir, node.name, fingerprint),
            attempt="",
            inputs=input_datasets,
            resources=effective_resources(node, self.loaded),
            fan_out=FanOut(node.name, self.use_ray),
        )

    def fingerprint_of(self, node: Node, fingerprints: dict[str, str]) -> "Fingerprint":
        stage = node.cls(self.loaded.resolved_stage_configs[node.name])
        probe = self._context(node, "", [])
        externals = stage.external_inputs(probe)
        extras = stage.fingerprint_extras(probe)
        if externals:
            # the rule enters the payload only when it is not the default (outputs built before keep their fingerprint)
            extras = {**extras, "external_inputs": [{"name": e.name, "files": list(e.files), **({"identity": e.identity} if e.identity != "stat" else {})}
                                                    for e in externals]}
        declared = fingerprinted_config(self.loaded.declared_stage_configs[node.name])
        inputs = [(str(r), fingerprints[r.stage]) for r in node.inputs]
        seed = self.loaded.resolved.seed if node.cls.uses_seed else None
        code_files = node.cls.code_files()
        payload = mf.fingerprint_payload(node.cls.name, node.cls.version, declared, inputs, extras, seed, combined_digest(code_files),
                                         DIGEST_SCOPE, library_versions(node.cls.libraries))
        return Fingerprint(mf.digest(payload), payload, code_files, externals)

    def fingerprints(self) -> dict[str, "Fingerprint"]:
        """Every stage's fingerprint, in pipeline order (nothing runs, nothing is read but the
        external inputs' sizes and dates)."""
        out: dict[str, Fingerprint] = {}
        for node in self.order:
            out[node.name] = self.fingerprint_of(node, {name: f.value for name, f in out.items()})
        return out

    # -- running ----------------------------------------------------------------------------
    def run(self, only: Optional[str] = None, start_from: Optional[str] = None, force: bool = False, argv: Optional[list[str]] = None,
            tags: Optional[dict[str, str]] = None) -> RunReport:
        """``tags``: more tags of the pipeline run (a variant's, under its ablation run)."""
        for flag, name in (("--stage", only), ("--from", start_from)):
            if name is not None and name not in self.by_name:
                raise ConfigError(f"{self.loaded.path}: {flag} {name}: no such stage (stages: {', '.join(self.by_name)})")
        if only:
            selected = upstream_of(self.order, only) + [only]
            forced = {only}
        elif start_from:
            selected = [n.name for n in self.order]
            forced = set(downstream_of(self.order, start_from))
        else:
            selected = [n.name for n in self.order]
            forced = set(selected) if force else set()

        computed = self.fingerprints()
        fingerprints = {name: f.value for name, f in computed.items()}

        if only:  # upstream must already be committed: --stage never rebuilds upstream silently
            for name in selected[:-1]:
                sd = mf.stage_uri(self.work_dir, name, fingerprints[name])
                if mf.load_manifest(self.storage, sd) is None:
                    raise StageFailed(
                        f"--stage {only}: upstream stage {name!r} has no committed output for this config"
                        f" (fingerprint {fingerprints[name]}, expected {sd}); run the pipeline without --stage first"
                    )

        if self.use_ray and self.ray_address == RAY_NOT_STARTED and any(
                name in forced or mf.load_manifest(self.storage, mf.stage_uri(self.work_dir, name, fingerprints[name])) is None
                for name in selected):  # something will compute: Ray starts while the MLflow store opens
            self.ray_address = init_ray(self.loaded, self.address)
        report = RunReport(None)
        if self.tracker:
            cfg = self.loaded.declared
            report.pipeline_run_id = self.tracker.start_pipeline(
                cfg.name,
                self.loaded.path,
                self.loaded.text,
                params={"pipeline": {"name": cfg.name, "work_dir": cfg.work_dir, "seed": cfg.seed, "stages": list(cfg.stages)}},
                tags={
                    "lmpipe.argv": " ".join(argv or sys.argv),
                    "lmpipe.ray_address": self.ray_address,
                    "lmpipe.work_dir": self.work_dir,
                    **(tags or {}),
                },
            )
        if report.pipeline_run_id:
            log.info("pipeline %s: MLflow run %s (%s)", self.loaded.resolved.name, report.pipeline_run_id, self.tracker.tracking_uri)
        status = "FAILED"
        # every stage folder this run may read, published before any manifest is read, so that
        # another run's commit never deletes an attempt under it
        stage_dirs = [mf.stage_uri(self.work_dir, name, fp) for name, fp in fingerprints.items()]
        try:
            with ReaderLease(self.storage, self.work_dir, stage_dirs, run=report.pipeline_run_id) as lease:
                self._reader_lease = lease
                try:
                    for name in selected:
                        node = self.by_name[name]
                        report.stages.append(self._run_stage(node, fingerprints, computed[name], name in forced, report))
                finally:
                    self._reader_lease = None
            status = "FINISHED"
        finally:
            if self.tracker:
                summary = {
                    s.name: {"fingerprint": s.fingerprint, "cached": s.cached, "output": s.stage_dir, "counts": s.manifest.get("counts")}
                    for s in report.stages
                }
                artifacts = funnel_artifacts([s.manifest for s in report.stages]) if report.stages else {}
                self.tracker.end_pipeline(status, summary, artifacts, tags={"lmpipe.ray_address": self.ray_address})
        return report

    def _inputs_for(self, node: Node, fingerprints: dict[str, str]) -> list[InputDataset]:
        out = []
        for ref in node.inputs:
            sd = mf.stage_uri(self.work_dir, ref.stage, fingerprints[ref.stage])
            manifest = mf.load_manifest(self.storage, sd)
            if manifest is None:
                raise StageFailed(f"stage {node.name!r}: input {ref} is not committed at {sd}")
            out.append(InputDataset(ref, sd, manifest, self.storage))
        return out

    def _run_stage(self, node: Node, fingerprints: dict[str, str], why: "Fingerprint", forced: bool, report: RunReport) -> StageReport:
        fp = fingerprints[node.name]
        stage_dir = mf.stage_uri(self.work_dir, node.name, fp)
        existing = None if forced else mf.load_manifest(self.storage, stage_dir)
        lock = None
        if existing is None:  # one run computes an output at a time; another one fails at once, naming it
            lock = StageLock(self.storage, stage_dir, node.name, run=report.pipeline_run_id)
            lock.acquire()
            if not forced:  # committed by a run that finished between our look and the lock
                existing = mf.load_manifest(self.storage, stage_dir)
        try:
            return self._run_stage_locked(node, fingerprints, why, stage_dir, existing, lock)
        finally:
            if lock is not None:
                lock.release()

    def _run_stage_locked(self, node: Node, fingerprints: dict[str, str], why: "Fingerprint", stage_dir: str,
                          existing: Optional[dict[str, Any]], lock: Optional[StageLock]) -> StageReport:
        fp = why.value
        cached = existing is not None
        entry = self.loaded.declared.stages[node.name]
        run_id = None
        if self.tracker:
            run_id = self.tracker.start_stage(
                node.name, entry.uses, node.cls.version, fp, cached,
                self.loaded.declared_stage_configs[node.name].model_dump(mode="json"), self.ray_address,
            )
        try:
            inputs = self._inputs_for(node, fingerprints)
            if cached:
                manifest = existing
                log.info("[%s] cached (fingerprint %s): %s", node.name, fp, stage_dir)
                artifacts: dict[str, bytes] = {}
            else:
                manifest, artifacts = self._compute(node, why, inputs, lock, run_id)
            if run_id:
                refs = [{"ref": f"{r.ref.stage}.{r.ref.dataset}", "uri": r.uri, "fingerprint": r.fingerprint} for r in inputs]
                self.tracker.finish_stage(run_id, manifest, stage_dir, refs, artifacts)
        except BaseException as e:
            if run_id:
                self.tracker.fail_stage(run_id, "".join(traceback.format_exception_only(type(e), e)).strip())
            raise
        return StageReport(node.name, fp, cached, stage_dir, manifest, run_id)

    def _compute(self, node: Node, why: "Fingerprint", inputs: list[InputDataset], lock: StageLock,
                 run_id: Optional[str] = None) -> tuple[dict[str, Any], dict[str, bytes]]:
        fp = why.value
        if self.use_ray and self.ray_address == RAY_NOT_STARTED:  # started only when something must run
            self.ray_address = init_ray(self.loaded, self.address)
        config = self.loaded.resolved_stage_configs[node.name]
        ctx = self._context(node, fp, inputs)
        ctx.attempt = f"attempt-{uuid.uuid4().hex[:12]}"
        if self.tracker and run_id:
            ctx.mlflow_run_id, ctx.tracking_uri = run_id, self.tracker.tracking_uri
        # attempts of runs known to be gone go now; those of a run that may only be paused go
        # after our commit, when it can no longer commit them (StageLock.commit)
        self._remove_stale_attempts(node.name, ctx.stage_dir, lock, keep=self._committed_attempt(ctx.stage_dir), keep_failed=True,
                                    removable=lambda name: self._attempt_run_gone(ctx.stage_dir, name))
        self.storage.write_json_atomic(st.join(ctx.attempt_uri, mf.ATTEMPT_HOLDER), lock.holder)
        ctx.fan_out.check = lambda: self._check_leases(lock)
        stage = node.cls(config, seed=ctx.seed)
        resources = ctx.resources
        if self.use_ray:
            import ray

            check_cluster_resources(node.name, resources, ray.cluster_resources())
        job = PartJob(node.name, ctx.seed, self.storage, ctx.attempt_uri, ctx.attempt, resources.batch_size,
                      formats=tuple(sorted(node.cls.output_formats.items())), batch_bytes=resources.batch_bytes,
                      max_bytes_per_file=stage.output_file_bytes())
        def run_parts(parts: list[Part]) -> list[PartResult]:
            results = self._run_parts(ctx.fan_out, node.cls, config, largest_first(parts), job, resources, lock)
            if isinstance(stage, DatasetStage):
                ctx.part_results.extend(results)
            return results

        ctx.run_parts = run_parts

        started = time.time()
        t0 = time.perf_counter()
        log.info("[%s] running %s v%s (fingerprint %s)", node.name, node.cls.name, node.cls.version, fp)
        if isinstance(stage, RowStage):
            src = inputs[0]
            parts = [Part(f"{i:05d}", {"uri": uri}, size) for i, (uri, size) in enumerate(zip(src.files(), src.file_sizes()))]
            results = ctx.run_parts(parts)
        elif isinstance(stage, SourceStage):
            parts = stage.plan(ctx)
            results = ctx.run_parts(parts)
        elif isinstance(stage, DatasetStage):
            stage.setup()
            stage.run(ctx)
            results = ctx.part_results
            parts = results
        else:
            raise TypeError(f"{node.cls.__name__} is not a RowStage, SourceStage or DatasetStage")
        wall = time.perf_counter() - t0
        merged = merge_results(results)
        record = self._manifest(node, why, ctx, inputs, merged, len(parts), started, wall)
        manifest = record.to_json()
        self._check_counts(node, manifest)
        try:
            stage.check(record)  # a stage's own acceptance rule (e.g. ingest's max_bad_fraction)
        except Exception as e:
            self.storage.write_json_atomic(st.join(ctx.attempt_uri, mf.FAILED_MARKER), {"error": str(e), "manifest": manifest})
            raise CheckFailed(f"{e} [this attempt's outputs are kept in {ctx.attempt_uri} until {node.name!r} next commits]") from e
        self._check_leases(lock)
        lock.commit(manifest)  # the commit: conditional on our lease and on the marker we saw
        self._remove_stale_attempts(node.name, ctx.stage_dir, lock, keep=ctx.attempt,
                                    folders=node.cls.superseded_folders(record, self.storage.ls_dirs(ctx.stage_dir)))
        c = manifest["counts"]
        log.info(
            "[%s] committed %s: %d in, %d kept, %d rejected, %d quarantined in %.1fs",
            node.name, fp, c["rows_in"], c["kept"], sum(c["rejected"].values()), sum(c["quarantined"].values()), wall,
        )
        return manifest, ctx.artifacts

    def _remove_stale_attempts(self, stage: str, stage_dir: str, lock: StageLock, keep: Optional[str], keep_failed: bool = False,
                               removable=None, folders: tuple[str, ...] | list[str] = ()) -> None:
        """Crashed and superseded attempts go, and the stage's superseded work ``folders`` (train's
        earlier Ray Train runs), unless another running pipeline may read them: then they stay
        until a later commit of this stage finds no such reader. Only while the stage's lock is
        still ours (renewed first)."""
        readers = live_readers(self.storage, self.work_dir, stage_dir, ignore=self._reader_lease.id if self._reader_lease else None)
        if readers:
            log.info("[%s] keeping earlier attempts in %s: %d other run(s) may read them (%s)", stage, stage_dir, len(readers),
                     "; ".join(describe(r) for r in readers))
            return
        lock.renew()
        mf.remove_stale_attempts(self.storage, stage_dir, keep=keep, keep_failed=keep_failed, removable=removable)
        for folder in folders:
            log.info("[%s] removing %s: the committed output does not use it", stage, st.join(stage_dir, folder))
            self.storage.rm(st.join(stage_dir, folder))

    def _attempt_run_gone(self, stage_dir: str, attempt: str) -> bool:
        """Whether the run that wrote an attempt is known to be gone (a dead pid on this host, or
        an attempt that does not say who wrote it)."""
        holder = mf.attempt_holder(self.storage, stage_dir, attempt)
        return holder is None or process_gone(holder.get("host"), holder.get("pid"))

    def _check_leases(self, lock: StageLock) -> None:
        """Stop the stage (LeaseLost) once its lock, or this run's reader lease, is lost."""
        lock.check()
        if self._reader_lease is not None:
            self._reader_lease.check()

    def _committed_attempt(self, stage_dir: str) -> Optional[str]:
        m = mf.load_manifest(self.storage, stage_dir)
        return m["attempt"] if m else None

    def _run_parts(self, fan_out: FanOut, stage_cls, config, parts: list[Part], job: PartJob, resources: Resources,
                   lock: StageLock) -> list[PartResult]:
        stage_name = fan_out.stage_name
        started = time.perf_counter()
        totals = {"rows": 0, "bytes": 0, "last_log": 0.0}

        def progress(result: PartResult, done: int, total: int) -> None:
            self._check_leases(lock)  # a lost lease stops the stage at the next part
            totals["rows"] += result.rows_in
            totals["bytes"] += result.bytes_in
            now = time.perf_counter()
            elapsed = max(now - started, 1e-9)
            line = (f"[{stage_name}] {done}/{total} parts done: {totals['rows']:,} rows,"
                    f" {console.format_rate(totals['rows'] / elapsed, ' rows')}, {console.format_rate(totals['bytes'] / elapsed, 'B')},"
                    f" ETA {console.format_eta(elapsed / done * (total - done))}")
            console.status(line)  # the live line, in a terminal
            if done != total and now - totals["last_log"] < (60.0 if console.is_live() else 5.0):
                return  # elsewhere, a line every 5 s at most
            totals["last_log"] = now
            log.info("%s", line)

        return run_parts(fan_out, stage_cls, config, parts, job, resources, on_result=progress)

    def _manifest(self, node: Node, why: "Fingerprint", ctx: StageContext, inputs: list[InputDataset],
                  merged: MergedParts, num_parts: int, started: float, wall: float) -> Manifest:
        fp, externals = why.value, why.externals
        for ds in merged.files:
            if ds not in node.cls.outputs:
                raise StageFailed(f"stage {node.name!r} wrote dataset {ds!r} that it does not declare in outputs {node.cls.outputs}")
        datasets = {
            ds: DatasetEntry(
                files=merged.files.get(ds, []),
                rows=merged.rows.get(ds, 0),
                bytes=sum(f.bytes for f in merged.files.get(ds, [])),
                chars=merged.chars.get(ds, 0),
                schema=merged.schemas.get(ds),
            )
            for ds in node.cls.outputs
        }
        consumed = ctx.counts
        rows_in = consumed.rows_in if consumed else merged.rows_in
        rejected = dict(merged.reasons.get("rejected", {}))
        for reason, n in (consumed.rejected if consumed else {}).items():
            rejected[reason] = rejected.get(reason, 0) + n
        counts = Counts(
            rows_in=rows_in,
            kept=consumed.kept if consumed else merged.rows.get("data", 0),
            rejected=dict(sorted(rejected.items())),
            quarantined=dict(sorted(merged.reasons.get("quarantine", {}).items())),
            chars_rejected=dict(sorted(merged.reason_chars.get("rejected", {}).items())),
            chars_quarantined=dict(sorted(merged.reason_chars.get("quarantine", {}).items())),
        )
        manifest = Manifest(
            format=mf.MANIFEST_FORMAT,
            pipeline=self.loaded.declared.name,
            stage=node.name,
            uses=node.cls.name,
            version=node.cls.version,
            fingerprint=fp,
            attempt=ctx.attempt,
            config=self.loaded.declared_stage_configs[node.name].model_dump(mode="json"),
            seed=ctx.seed if node.cls.uses_seed else None,
            inputs=[
                InputEntry(ref=str(r.ref), stage=r.ref.stage, dataset=r.ref.dataset, fingerprint=r.fingerprint, stage_dir=r.stage_dir)
                for r in inputs
            ],
            external_inputs=[ExternalInputEntry(name=e.name, uri=e.uri, files=list(e.files)) for e in externals],
            datasets=datasets,
            counts=counts,
            # what rows_in/kept count: documents (the funnel) or other rows (checkpoints, metrics)
            counts_unit="documents" if (node.cls.measure_column or consumed) else "rows",
            counters=merged.counters,
            metrics=dict(ctx.metrics),
            parts=num_parts,
            parts_per_node=dict(sorted(merged.nodes.items())),
            bytes_in=merged.bytes_in,
            timings=Timings(
                started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                wall_seconds=round(wall, 3),
                worker_seconds=round(merged.part_seconds, 3),
                rows_per_second=round(rows_in / wall, 1) if wall > 0 else 0.0,
            ),
            code_version=code_version(),
            # what the fingerprint was computed from, for `lmpipe explain`
            fingerprint_payload=why.payload,
            code_files=why.code_files,
            summary=self._summary(node, ctx),
        )
        return manifest

    @staticmethod
    def _summary(node: Node, ctx: StageContext) -> Optional[SummaryRecord]:
        declared = node.cls.Summary
        if ctx.summary is None:
            if declared is not None:
                raise StageFailed(f"stage {node.name!r} declares a {declared.__name__} summary but did not set one (ctx.set_summary)")
            return None
        if declared is None or not isinstance(ctx.summary, declared):
            raise StageFailed(f"stage {node.name!r} set a {type(ctx.summary).__name__} summary; it declares"
                              f" {declared.__name__ if declared else 'none'} (Summary = ...)")
        record = SummaryRecord.of(ctx.summary)
        try:  # what is committed must read back as what downstream stages will ask for
            record.read(declared)
        except ValueError as e:
            raise StageFailed(f"stage {node.name!r}: {e}") from None
        return record

    def _check_counts(self, node: Node, manifest: dict[str, Any]) -> None:
        """in = kept + rejected + quarantined, for every stage that maps rows to rows."""
        if issubclass(node.cls, DatasetStage) and not node.cls.row_preserving:
            return
        c = manifest["counts"]
        out = c["kept"] + sum(c["rejected"].values()) + sum(c["quarantined"].values())
        if out != c["rows_in"]:
            raise CountsMismatch(
                f"stage {node.name!r}: {c['rows_in']} rows in but {c['kept']} kept + {sum(c['rejected'].values())} rejected"
                f" + {sum(c['quarantined'].values())} quarantined = {out}"
            )
