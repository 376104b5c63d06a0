"""The stage contract.

A stage declares a versioned name, a typed frozen config, the columns it requires and
produces, and the resources it needs; then it implements exactly one method:

* :class:`RowStage` – ``process_batch(table) -> table`` over a ``pyarrow.Table`` batch. The
  stage may add attribute columns, rewrite ``text``, and set ``drop_reason`` (rejected, with a
  named reason) or ``quarantine_reason`` (bad input) per row; null keeps the row. The runner
  checks that every row comes out exactly once, splits the rows into the ``data``,
  ``rejected`` and ``quarantine`` datasets, counts by reason, times, writes and records.
* :class:`SourceStage` – ``plan(ctx)`` lists independent parts (e.g. input files) and
  ``read_part(part, ctx)`` yields Arrow tables for one part; the runner writes them the same way.
* :class:`DatasetStage` – ``run(ctx)`` for whole-dataset work (dedup, tokenize, train,
  evaluate): parallel work through ``ctx.fan_out`` (or ``ctx.run_parts`` for output parts),
  outputs through ``ctx``, what downstream needs as a typed :class:`StageSummary`.

Stages never count, time, write manifests, start Ray work by hand or talk to MLflow themselves:
the context does (``ctx.log_metric``, ``ctx.log_metrics(step=...)``, ``ctx.log_artifact``,
``ctx.log_inputs``, ``ctx.log_model``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Optional

import pyarrow as pa

from pipeline.contracts import Manifest, StageSummary
from pipeline.types import DROP_REASON, QUARANTINE_REASON, REASON_COLUMNS, StrictModel

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.context import ExternalInput, PartContext, StageContext

__all__ = ["DROP_REASON", "OUTPUT_WRITERS", "PART_WRITERS", "QUARANTINE_REASON", "REASON_COLUMNS", "DatasetStage", "Part", "Resources",
           "RowStage", "SourceStage", "Stage", "StageSummary", "stage_seed", "Comparison"]


# What writes a stage's bytes (Stage.writes_through, part of its code digest). Parts that run
# through the runner (a row or source stage's, ``ctx.run_parts``) are batched and routed by
# execute, written by io with the reason columns of types, and committed by storage;
# ``ctx.part_outputs`` (PartOutputs) writes through io and storage only.
PART_WRITERS = ("pipeline.execute", "pipeline.io", "pipeline.storage", "pipeline.types")
OUTPUT_WRITERS = ("pipeline.io", "pipeline.storage")


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs. ``actors=True`` runs the parts on a pool of long-lived
    workers (``FanOut.map_on_workers``) so that ``setup()`` (a model, a tokenizer) runs once per
    worker rather than once per part."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: bool = False
    batch_size: int = 2048
    # A batch also stops at about this many bytes of string data: scoring costs a multiple of a
    # batch's text (the quality filter ~25 bytes per character), so a count of rows alone lets
    # a part of long documents put its whole text in one batch.
    batch_bytes: int = 16 * 2**20
    max_workers: Optional[int] = None
    custom: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    """One independent unit of work. ``id`` is deterministic and names the output files."""

    id: str
    payload: dict[str, Any]
    # bytes of input it reads (0: unknown). The runner starts the largest parts first, so that a
    # large part is not left to run alone at the end; outputs are in part order whatever the order.
    size: int = 0


@dataclass(frozen=True)
class Comparison:
    """Variants of a pipeline compared on one stage's outputs (``lmpipe compare``)."""

    markdown: str
    csv: str
    png: Optional[bytes] = None  # a plot, when the stage draws one


class EmptyConfig(StrictModel):
    pass


class Stage:
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    Config: ClassVar[type[StrictModel]] = EmptyConfig
    requires: ClassVar[tuple[str, ...]] = ()
    produces: ClassVar[tuple[str, ...]] = ()
    # Columns this stage removes from its input (for the static column check downstream).
    removes: ClassVar[tuple[str, ...]] = ()
    # True when the output rows are new records holding exactly ``produces`` (a source, packed
    # token sequences, a checkpoint table), not the input rows with columns added or removed.
    new_rows: ClassVar[bool] = False
    resources: ClassVar[Resources] = Resources()
    # (min, max) number of upstream inputs; None = unbounded.
    num_inputs: ClassVar[tuple[int, Optional[int]]] = (1, 1)
    # The datasets this stage writes; the first one is what downstream stages read by default.
    outputs: ClassVar[tuple[str, ...]] = ("data",)
    # Output file format per dataset: "parquet" (default) or "arrow" (Arrow IPC, memory-mappable).
    output_formats: ClassVar[dict[str, str]] = {}
    # Whether the pipeline seed is part of this stage's fingerprint (stages that sample/shuffle).
    uses_seed: ClassVar[bool] = False
    # The string column whose characters the runner counts per dataset (None: no such column).
    measure_column: ClassVar[Optional[str]] = "text"
    # The framework modules whose code decides the bytes this stage writes; with the stage's own
    # import closure they make its code digest (pipeline.code_digest).
    writes_through: ClassVar[tuple[str, ...]] = PART_WRITERS
    # The libraries (distribution names) whose version decides this stage's bytes: their installed
    # versions enter its fingerprint. pyarrow writes every stage's files (its version is in each
    # Parquet footer); a stage adds what computes its output (tokenizers, torch, a language model).
    libraries: ClassVar[tuple[str, ...]] = ("pyarrow",)
    # Modules of this stage's package that only present its committed outputs (``lmpipe compare``,
    # ``lmpipe eval-table``: compare_outputs/render_table), never compute them: outside its code
    # digest, so a change to how a comparison is drawn does not recompute what it compares. They
    # may be imported only inside those two methods (a test checks it).
    presentation: ClassVar[tuple[str, ...]] = ()
    # The summary this stage hands downstream (set with ctx.set_summary), if any.
    Summary: ClassVar[Optional[type[StageSummary]]] = None

    def __init__(self, config: StrictModel, seed: int = 0):
        self.config = config
        self.seed = seed  # this stage's own seed, derived from the pipeline seed and stage name

    def setup(self) -> None:
        """Expensive initialisation; runs once per worker (once per actor for actor stages)."""

    def fingerprint_extras(self, ctx: "StageContext") -> dict[str, Any]:
        """Anything beyond config, inputs and external inputs that decides the output."""
        return {}

    def external_inputs(self, ctx: "StageContext") -> list["ExternalInput"]:
        """Data read from outside the pipeline (source files, eval sets): fingerprinted by
        version (size + mtime/ETag) and recorded as MLflow input datasets for lineage."""
        return []

    def output_file_bytes(self) -> Optional[int]:
        """The most string data one output file of a part holds before the part rolls over to its
        next file (None: no bound). A source stage that may read a big file in one part (a
        compressed stream) sets it, so that every later stage -- one part per file it reads --
        gets parts of bounded size."""
        return None

    def check(self, manifest: Manifest) -> None:
        """Called with the finished manifest before it is committed; raise to fail the stage."""

    @classmethod
    def superseded_folders(cls, manifest: Manifest, folders: list[str]) -> list[str]:
        """Which of its output folder's ``folders`` (besides ``attempt-*``) this stage no longer
        needs once ``manifest`` is committed: removed after the commit and by ``lmpipe gc``, with
        the protections of superseded attempts (train: its earlier Ray Train runs)."""
        return []

    @classmethod
    def code_files(cls) -> dict[str, str]:
        """{file: digest} of the code that decides this stage's bytes: its module's import closure,
        less its presentation modules, plus the framework modules it writes through."""
        from pipeline.code_digest import code_digests

        return code_digests(cls.__module__, cls.writes_through, cls.presentation)

    @classmethod
    def compare_outputs(cls, results: dict[str, list[dict[str, Any]]], base_runs: list[str], sigmas: float,
                        title: str) -> "Comparison":
        """``lmpipe compare``: the committed ``data`` rows of each variant's output (by variant
        name) compared against the base runs. The command finds and reads the outputs."""
        raise NotImplementedError(f"stage {cls.name!r} has no comparison of variants")

    @classmethod
    def render_table(cls, rows: list[dict[str, Any]], fmt: str) -> str:
        """A committed output's ``data`` rows as a table for people (``lmpipe eval-table``), as
        ``markdown`` or ``csv``. The command finds and reads the output; the stage only renders."""
        raise NotImplementedError(f"stage {cls.name!r} has no table view")

    @classmethod
    def output_columns(cls, input_columns: Optional[set[str]]) -> Optional[set[str]]:
        """Columns of the ``data`` output given the input's; None when unknown."""
        if cls.new_rows:
            return set(cls.produces)
        if input_columns is None:
            return set(cls.produces) if cls.produces else None
        return (input_columns - set(cls.removes)) | set(cls.produces)


class RowStage(Stage):
    """A stage that maps each row of its single input to one row (kept, rejected or quarantined)."""

    outputs = ("data", "rejected", "quarantine")

    def process_batch(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError


class SourceStage(Stage):
    """A stage with no upstream input: it reads external data part by part."""

    num_inputs = (0, 0)
    outputs = ("data", "quarantine")
    new_rows = True

    def plan(self, ctx: "StageContext") -> list[Part]:  # pragma: no cover - abstract
        raise NotImplementedError

    def read_part(self, part: Part, ctx: "PartContext") -> Iterator[pa.Table]:  # pragma: no cover
        raise NotImplementedError


class DatasetStage(Stage):
    """A stage that needs the whole dataset at once (dedup, tokenize, train, evaluate).

    ``run(ctx)`` does the global work, in parallel through ``ctx.fan_out``, and
    writes its outputs either through ``ctx.run_parts(parts)`` -- which calls the stage's
    ``process_part(part, part_ctx)`` on Ray workers and routes the yielded tables by
    ``drop_reason``/``quarantine_reason`` exactly like a row stage -- or, for small outputs, through
    ``ctx.part_outputs(part_id)`` on the driver followed by ``ctx.add_part_result(outputs.close())``.
    Set ``row_preserving = True`` when every input row comes out exactly once, so the runner
    enforces in = kept + rejected + quarantined.
    """

    row_preserving: ClassVar[bool] = False
    # Outputs written through ``ctx.part_outputs``/PartOutputs; a stage whose outputs go through
    # ``ctx.run_parts`` declares PART_WRITERS.
    writes_through: ClassVar[tuple[str, ...]] = OUTPUT_WRITERS

    def run(self, ctx: "StageContext") -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def stage_seed(pipeline_seed: int, stage_name: str) -> int:
    """A stage's own seed, derived from the pipeline seed and the stage's name."""
    digest = hashlib.sha256(f"{pipeline_seed}:{stage_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
