"""Worker-side execution of parts, and the fan-out of a stage's parts (through its FanOut).

The unit of parallel work is a *part* (an input file of a row stage, a source file of ingest).
Parts run through the stage's ``FanOut`` (pipeline/fanout.py), as tasks or on long-lived workers;
each part reads its input in bounded Arrow batches, calls the stage's batch method, and streams
the results to Parquet. A part's result (a PartResult: counts, files, or its error) is small.
"""

from __future__ import annotations

import errno
import functools
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage as st
from pipeline.context import PartContext
from pipeline.fanout import FanOut
from pipeline.contracts import MergedParts, PartResult
from pipeline.io import PartOutputs, iter_parquet_batches, string_bytes_per_row
from pipeline.stage import DROP_REASON, QUARANTINE_REASON, Part, RowStage, SourceStage, Stage


class StageContractError(RuntimeError):
    """A stage broke its contract (lost rows, missing columns): a bug in the stage, not in the data."""


@dataclass(frozen=True)
class PartJob:
    """Everything a worker needs besides the part itself. Holds resolved secrets: never logged."""

    stage_name: str
    seed: int
    storage: st.Storage
    attempt_uri: str
    attempt: str
    batch_size: int
    max_rows_per_file: int = 50_000
    formats: tuple[tuple[str, str], ...] = ()
    batch_bytes: int = 16 * 2**20
    max_bytes_per_file: Optional[int] = None  # the stage's output_file_bytes()


def bounded_batches(batch: pa.Table, max_bytes: int) -> list[pa.Table]:
    """``batch`` cut into runs of rows holding at most ``max_bytes`` of string data each (a row
    larger than that alone), so a stage's working memory follows the bytes it is given, not the
    length of its documents. Zero-copy slices; a batch within the bound is returned whole."""
    if batch.num_rows <= 1 or batch.nbytes <= max_bytes:
        return [batch]
    sizes = string_bytes_per_row(batch)
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        if i > start and total + size > max_bytes:
            out.append(batch.slice(start, i - start))
            start, total = i, 0
        total += size
    out.append(batch.slice(start))
    return out


def split_by_reason(outputs: PartOutputs, table: pa.Table) -> None:
    """Route rows: quarantine_reason set -> quarantine; drop_reason set -> rejected; else data."""
    names = table.column_names
    has_q = QUARANTINE_REASON in names
    has_d = DROP_REASON in names
    if not has_q and not has_d:
        outputs.write("data", table)
        return
    q_mask = pc.is_valid(table.column(QUARANTINE_REASON)) if has_q else pa.array([False] * table.num_rows)
    d_mask = pc.is_valid(table.column(DROP_REASON)) if has_d else pa.array([False] * table.num_rows)
    d_mask = pc.and_(d_mask, pc.invert(q_mask))
    keep_mask = pc.invert(pc.or_(q_mask, d_mask))
    reason_cols = [c for c in (QUARANTINE_REASON, DROP_REASON) if c in names]
    outputs.write("data", table.filter(keep_mask).drop_columns(reason_cols))
    if has_d:
        rejected = table.filter(d_mask)
        outputs.write("rejected", rejected.drop_columns([QUARANTINE_REASON]) if has_q else rejected)
    if has_q:
        quarantined = table.filter(q_mask)
        outputs.write("quarantine", quarantined.drop_columns([DROP_REASON]) if has_d else quarantined)


def run_row_part(stage: RowStage, part: Part, job: PartJob) -> PartResult:
    outputs = PartOutputs(job.storage, job.attempt_uri, job.attempt, part.id, job.max_rows_per_file, stage.measure_column, dict(job.formats),
                          max_bytes_per_file=job.max_bytes_per_file)
    uri = part.payload["uri"]
    rows_in = 0
    checked = False
    for batch in (b for rows in iter_parquet_batches(job.storage, uri, job.batch_size) for b in bounded_batches(rows, job.batch_bytes)):
        if not checked:
            missing = [c for c in stage.requires if c not in batch.column_names]
            if missing:
                raise StageContractError(f"stage {job.stage_name!r} requires column(s) {missing}; {uri} has {batch.column_names}")
            checked = True
        rows_in += batch.num_rows
        result = stage.process_batch(batch)
        if result.num_rows != batch.num_rows:
            raise StageContractError(
                f"stage {job.stage_name!r} returned {result.num_rows} rows for a batch of {batch.num_rows}"
                f" ({uri}): a row stage must return every row exactly once; use drop_reason to remove rows"
            )
        split_by_reason(outputs, result)
    return outputs.close(rows_in=rows_in, bytes_in=job.storage.size(uri))


def run_generator_part(stage: Stage, part: Part, job: PartJob) -> PartResult:
    """A SourceStage's ``read_part`` or a DatasetStage's ``process_part``: tables in, routed by reason.

    The stage may report ``ctx.count("rows_in", n)`` and ``ctx.count("bytes_in", n)``; without
    ``rows_in`` every row written counts as one row in."""
    outputs = PartOutputs(job.storage, job.attempt_uri, job.attempt, part.id, job.max_rows_per_file, stage.measure_column, dict(job.formats),
                          max_bytes_per_file=job.max_bytes_per_file)
    ctx = PartContext(job.stage_name, job.seed, job.storage, outputs)
    produce = stage.read_part if isinstance(stage, SourceStage) else stage.process_part
    for table in produce(part, ctx):
        split_by_reason(outputs, table)
    bytes_in = int(outputs.counters.pop("bytes_in", 0))
    rows_in = outputs.counters.pop("rows_in", None)
    return outputs.close(rows_in=None if rows_in is None else int(rows_in), bytes_in=bytes_in)


def run_part(stage: Stage, part: Part, job: PartJob) -> PartResult:
    started = time.perf_counter()
    try:
        if isinstance(stage, RowStage):
            result = run_row_part(stage, part, job)
        elif isinstance(stage, SourceStage) or hasattr(stage, "process_part"):
            result = run_generator_part(stage, part, job)
        else:
            raise TypeError(f"{type(stage).__name__} does not run part by part (no process_part)")
    except Exception as e:
        # returned, not raised: through Ray a worker's exception arrives as a 40-line dump with
        # colour codes; as data it becomes one line on the driver (the traceback kept for --traceback)
        return PartResult(part=part.id, error=part_error_message(job.stage_name, part, e), traceback=traceback.format_exc())
    return result.model_copy(update={"seconds": time.perf_counter() - started, "node": _node_id()})


class PartFailed(RuntimeError):
    """A part failed on a worker: the message names the stage, the part and its file; the worker's
    traceback is kept for ``--traceback``."""

    def __init__(self, message: str, worker_traceback: str = ""):
        super().__init__(message)
        self.worker_traceback = worker_traceback


def part_error_message(stage_name: str, part: Part, e: BaseException) -> str:
    if isinstance(e, StageContractError):
        return str(e)
    where = part.payload.get("uri", part.id)
    message = f"stage {stage_name!r} failed on part {part.id} ({where}): {type(e).__name__}: {e}"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        message += "; free space there and run again (committed stages are kept, this one restarts)"
    return message


def _raise_if_failed(result: PartResult) -> None:
    if result.error is not None:
        raise PartFailed(result.error, result.traceback)


def _node_id() -> str:
    """The Ray node a part ran on (recorded so placement is visible in the manifest)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray
        pass
    return "local"


class StageSetupFailed(RuntimeError):
    """A stage's ``setup()`` failed on a worker (a model or a list it loads): one line naming the stage."""


def set_up_stage(stage_cls: type[Stage], config: Any, stage_name: str, seed: int) -> Stage:
    """A worker's instance of the stage, ``setup()`` done."""
    stage = stage_cls(config, seed=seed)
    try:
        stage.setup()
    except Exception as e:
        raise StageSetupFailed(f"stage {stage_name!r} failed to set up on a worker: {type(e).__name__}: {e}") from e
    return stage


def run_part_set_up_here(stage_cls: type[Stage], config: Any, part: Part, job: PartJob) -> PartResult:
    """One part with a stage instance of its own (stages whose ``setup()`` is cheap)."""
    try:
        stage = set_up_stage(stage_cls, config, job.stage_name, job.seed)
    except StageSetupFailed as e:
        return _setup_failed(e, part)
    return run_part(stage, part, job)


# The stage this worker process last set up, with the attempt it was set up for: a worker process
# serves many tasks, of several stages of a run, without importing everything again; a stage
# whose setup() is expensive (Resources(actors=True)) sets up once per process and attempt, and
# another stage, or another attempt, never sees that instance. One at a time: the next one
# replaces it, so a process holds one stage's setup at most.
_SET_UP_IN_THIS_PROCESS: Optional[tuple[str, Stage]] = None


def run_part_on_process_stage(stage_cls: type[Stage], config: Any, part: Part, job: PartJob) -> PartResult:
    """One part with the instance of its stage that this worker process set up for this attempt
    (``setup()`` once per process, as on a long-lived worker, without holding the worker's CPUs
    between parts)."""
    global _SET_UP_IN_THIS_PROCESS
    key = job.attempt_uri  # one stage's one computation: its stage folder and attempt
    if _SET_UP_IN_THIS_PROCESS is None or _SET_UP_IN_THIS_PROCESS[0] != key:
        _SET_UP_IN_THIS_PROCESS = None  # the previous stage's setup goes before the next one is made
        try:
            _SET_UP_IN_THIS_PROCESS = (key, set_up_stage(stage_cls, config, job.stage_name, job.seed))
        except StageSetupFailed as e:
            return _setup_failed(e, part)
    return run_part(_SET_UP_IN_THIS_PROCESS[1], part, job)


def _setup_failed(e: StageSetupFailed, part: Part) -> PartResult:
    return PartResult(part=part.id, error=f"{e} (part {part.id}, {part.payload.get('uri', part.id)})", traceback=traceback.format_exc())


def parallel_workers(resources: Any, parts: int, cluster: dict[str, float]) -> int:
    """How many parts run at once: as many as the cluster's CPUs hold, at most ``max_workers``."""
    cpus = max(resources.num_cpus, 0.0)
    workers = int(cluster.get("CPU", 1.0) // cpus) if cpus > 0 else parts
    if resources.max_workers:
        workers = min(workers, resources.max_workers)
    return max(1, min(workers, parts))


def run_parts(fan_out: FanOut, stage_cls: type[Stage], config: Any, parts: list[Part], job: PartJob, resources: Any,
              on_result: Optional[Callable[[PartResult, int, int], None]] = None) -> list[PartResult]:
    """Every part of a stage through ``fan_out``, as tasks. A stage with ``resources.actors`` sets
    up once per worker: once per worker process on CPUs (the processes serve the run's other
    stages too), on long-lived workers that hold their GPUs (``FanOut.map_on_workers``) when it
    needs GPUs. The first failed part stops the stage; ``on_result(result, done, total)`` as
    parts finish. Results in part order."""
    if not parts:
        return []

    def finished(result: Any, done: int, total: int) -> None:
        result = PartResult.checked(result, job.stage_name)
        _raise_if_failed(result)  # the first failed part stops the stage
        if on_result is not None:
            on_result(result, done, total)

    options: dict[str, Any] = {"step": "parts", "num_cpus": max(resources.num_cpus, 0.0), "num_gpus": resources.num_gpus,
                               "resources": dict(resources.custom) or None, "on_result": finished}
    workers = parallel_workers(resources, len(parts), fan_out.cluster_resources())
    if resources.actors and resources.num_gpus:  # a GPU task's process exits after it (Ray frees its GPU memory so)
        setup = functools.partial(set_up_stage, stage_cls, config, job.stage_name, job.seed)
        results = fan_out.map_on_workers(setup, run_part, [(p, job) for p in parts], workers=workers, **options)
    else:
        run = run_part_on_process_stage if resources.actors else run_part_set_up_here
        results = fan_out.map(run, [(stage_cls, config, p, job) for p in parts], max_parallel=workers, **options)
    return sorted((PartResult.checked(r, job.stage_name) for r in results), key=lambda r: r.part)


def merge_results(results: list[PartResult]) -> MergedParts:
    """Add up part results: rows, chars and reasons per dataset, counters, files in part order."""
    return MergedParts.of(results)
