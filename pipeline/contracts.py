"""What crosses a boundary, as typed models: a part's result (worker -> driver), the stage
summaries (stage -> the stages after it) and the manifest (a run -> the next run, ``lmpipe
explain``, the readers of an output).

This module imports nothing of ``pipeline`` or ``stages`` and nothing heavier than pydantic, so
any process -- a Ray worker, a reader of a manifest, a stage's ``summary.py`` -- can use it. A
value that does not fit its model fails where it is made or read, with the field that is wrong,
instead of as a ``KeyError`` three modules later.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# A counter's value: a count (int) or a measure (float); an int stays an int in the manifest.
Number = Union[int, float]


class Contract(BaseModel):
    """Base of the contracts: unknown keys are errors and values are not coerced ("3" is not 3)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


def describe_error(e: ValidationError, limit: int = 3) -> str:
    """A pydantic error in one line: ``rows.data: Input should be a valid integer (got '3')``."""
    parts = []
    for err in e.errors()[:limit]:
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{where}: {err['msg']} (got {err.get('input')!r:.60})")
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# -- part results (worker -> driver) -----------------------------------------------------------------

class OutputFile(Contract):
    """One file of a dataset, named relative to the stage's fingerprint folder."""

    path: str
    rows: int
    bytes: int


class PartResult(Contract):
    """What one part wrote and counted; a failed part carries only its ``error``."""

    part: str
    files: dict[str, list[OutputFile]] = {}  # dataset -> files, in write order
    schemas: dict[str, str] = {}  # dataset -> Arrow schema, as text
    rows: dict[str, int] = {}  # dataset -> rows written
    chars: dict[str, int] = {}  # dataset -> characters of the measured column
    reasons: dict[str, dict[str, int]] = {}  # dataset (rejected, quarantine) -> reason -> rows
    reason_chars: dict[str, dict[str, int]] = {}  # dataset -> reason -> characters
    counters: dict[str, Number] = {}  # a stage's own counts (ctx.count)
    rows_in: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    node: Optional[str] = None  # the Ray node the part ran on
    error: Optional[str] = None  # one line naming the stage, the part and its file
    traceback: str = ""  # the worker's traceback, for --traceback

    @classmethod
    def checked(cls, value: Any, stage: str) -> "PartResult":
        """``value`` (a PartResult, its dict or its JSON) as a PartResult, or a one-line error
        naming the stage, the part and the field that is wrong."""
        if isinstance(value, cls):
            return value
        try:
            if isinstance(value, (str, bytes)):
                return cls.model_validate_json(value)
            return cls.model_validate(value)
        except ValidationError as e:
            part = value.get("part", "?") if isinstance(value, dict) else "?"
            raise PartResultInvalid(f"stage {stage!r}: the result of part {part} is not a PartResult: {describe_error(e)}") from None


class PartResultInvalid(TypeError):
    """A part result of the wrong shape: a bug in the stage or the worker, not in the data."""


class MergedParts(Contract):
    """Every part's result added up: per dataset rows, chars and reasons; files in part order."""

    files: dict[str, list[OutputFile]] = {}
    schemas: dict[str, str] = {}
    rows: dict[str, int] = {}
    chars: dict[str, int] = {}
    reasons: dict[str, dict[str, int]] = {}
    reason_chars: dict[str, dict[str, int]] = {}
    counters: dict[str, Number] = {}
    rows_in: int = 0
    bytes_in: int = 0
    part_seconds: float = 0.0
    nodes: dict[str, int] = {}  # Ray node -> parts it ran

    @classmethod
    def of(cls, results: list[PartResult]) -> "MergedParts":
        m = cls()
        for r in sorted(results, key=lambda r: r.part):
            for ds, files in r.files.items():
                m.files.setdefault(ds, []).extend(files)
            for ds, schema in r.schemas.items():
                m.schemas.setdefault(ds, schema)
            for ds, n in r.rows.items():
                m.rows[ds] = m.rows.get(ds, 0) + n
            for ds, n in r.chars.items():
                m.chars[ds] = m.chars.get(ds, 0) + n
            for total, per_ds in ((m.reasons, r.reasons), (m.reason_chars, r.reason_chars)):
                for ds, reasons in per_ds.items():
                    bucket = total.setdefault(ds, {})
                    for reason, n in reasons.items():
                        bucket[reason] = bucket.get(reason, 0) + n
            for name, n in r.counters.items():
                m.counters[name] = m.counters.get(name, 0) + n
            m.rows_in += r.rows_in
            m.bytes_in += r.bytes_in
            m.part_seconds += r.seconds
            if r.node:
                m.nodes[r.node] = m.nodes.get(r.node, 0) + 1
        return m


# -- stage summaries (a stage -> the stages after it) ----------------------------------------------

class UnknownSummaryKind(ValueError):
    """A manifest names a summary kind that no summary class declares."""


_SUMMARY_KINDS: dict[str, type["StageSummary"]] = {}


class StageSummary(BaseModel):
    """What a stage tells the stages after it (a tokenizer's special ids, a tokenize stage's
    sequence length and splits, a training run's checkpoints), declared as a model. The runner
    stores it in the manifest under ``summary`` with its ``kind`` -- never among the manifest's
    own keys; a consumer asks its context for it by type (``ctx.upstream(TokenizeSummary)``),
    through any number of stages in between, and gets it validated. Each kind names one class."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str] = ""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if not cls.kind or not cls.kind.replace("_", "").isalnum() or cls.kind != cls.kind.lower():
            raise TypeError(f"summary {cls.__module__}.{cls.__qualname__}: kind {cls.kind!r} must be a snake_case name")
        existing = _SUMMARY_KINDS.get(cls.kind)
        # the same class imported again (a reloaded module) replaces itself; another class may not
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"summary kind {cls.kind!r} is declared twice: {existing.__module__}.{existing.__qualname__}"
                            f" and {cls.__module__}.{cls.__qualname__}")
        _SUMMARY_KINDS[cls.kind] = cls


def summary_class(kind: str) -> type[StageSummary]:
    """The summary class declaring ``kind`` (its module must have been imported)."""
    try:
        return _SUMMARY_KINDS[kind]
    except KeyError:
        raise UnknownSummaryKind(f"unknown summary kind {kind!r} (known: {', '.join(sorted(_SUMMARY_KINDS)) or 'none'})") from None


class SummaryRecord(Contract):
    """A summary as the manifest stores it: its kind and its fields."""

    kind: str
    data: dict[str, Any]

    @classmethod
    def of(cls, summary: StageSummary) -> "SummaryRecord":
        return cls(kind=summary.kind, data=summary.model_dump(mode="json"))

    def read(self, expected: Optional[type[StageSummary]] = None) -> StageSummary:
        """The summary as its class (``expected``, or the class registered for its kind)."""
        target = expected if expected is not None else summary_class(self.kind)
        if target.kind != self.kind:
            raise UnknownSummaryKind(f"a {self.kind!r} summary is not a {target.kind!r} summary")
        try:
            return target.model_validate(self.data)
        except ValidationError as e:
            raise ValueError(f"its {self.kind} summary does not validate as {target.__name__}: {describe_error(e)}") from None


# -- the manifest (the commit of one stage output) ---------------------------------------------------

class DatasetEntry(Contract):
    files: list[OutputFile]
    rows: int
    bytes: int
    chars: int = 0
    schema_: Optional[str] = Field(None, alias="schema")  # Arrow schema as text (None: nothing written)


class InputEntry(Contract):
    ref: str  # "stage.dataset"
    stage: str
    dataset: str
    fingerprint: str
    stage_dir: str


class ExternalInputEntry(Contract):
    name: str
    uri: str
    files: list[dict[str, Any]]  # each {"uri", "size", "mtime" or "etag"}


class Counts(Contract):
    """The funnel of one stage: rows in = kept + rejected + quarantined for stages that map rows
    to rows; a stage whose outputs are not documents reports the documents it consumed."""

    rows_in: int
    kept: int
    rejected: dict[str, int] = {}  # reason -> rows
    quarantined: dict[str, int] = {}
    chars_rejected: dict[str, int] = {}
    chars_quarantined: dict[str, int] = {}


class ConsumedDocuments(Contract):
    """What a dataset stage whose outputs are not documents (token sequences, checkpoints)
    reports about the documents it read (``ctx.counts``): the funnel and MLflow use it."""

    rows_in: int
    kept: int
    rejected: dict[str, int] = {}


class Timings(Contract):
    started_at: str  # UTC, ISO 8601
    wall_seconds: float
    worker_seconds: float = 0.0
    rows_per_second: float = 0.0


class Manifest(Contract):
    """``_manifest.json``, written last and atomically: the commit of one stage output. The
    runner owns every key; what is particular to a stage lives in ``summary``."""

    format: int
    pipeline: str
    stage: str
    uses: str
    version: str
    fingerprint: str
    attempt: str
    config: dict[str, Any]
    seed: Optional[int] = None
    inputs: list[InputEntry] = []
    external_inputs: list[ExternalInputEntry] = []
    datasets: dict[str, DatasetEntry]
    counts: Counts
    counts_unit: Literal["documents", "rows"] = "documents"  # what rows_in/kept count
    counters: dict[str, Number] = {}
    metrics: dict[str, Number] = {}
    parts: int = 0
    parts_per_node: dict[str, int] = {}
    bytes_in: int = 0
    timings: Timings
    code_version: str = "unknown"
    fingerprint_payload: dict[str, Any] = {}  # what the fingerprint was computed from, for `lmpipe explain`
    code_files: dict[str, str] = {}
    summary: Optional[SummaryRecord] = None

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON object stored on disk (the keys readers index)."""
        return self.model_dump(mode="json", by_alias=True)


# -- lmpipe trace (the training side -> the command) ---------------------------------------------------

class TraceError(ValueError):
    """A question ``lmpipe trace`` cannot answer (no train stage, a step the run does not have, an
    unknown document): said in one line."""


class SequenceSegment(Contract):
    """One document's tokens inside a packed training sequence."""

    doc_id: str
    start: int  # first token of the segment in the sequence
    tokens: int  # tokens of the document in this sequence
    copy_: int = Field(alias="copy")  # which mixture copy of the document (0: the first)


class TracedSequence(Contract):
    """A token shard row and, when training read it, where: optimizer step (1-based), rank, and
    the sequence's index among that rank's sequences of the step. A row training never read
    (past the last step, or the validation split) has no step."""

    split: str  # the tokenize output it is in: train or validation
    shard: str  # the shard file
    row: int  # row in that file
    seq_id: int  # the row's position in its packing stream
    source: str  # the source of the sequence's first token
    segments: list[SequenceSegment]
    step: Optional[int] = None
    rank: Optional[int] = None
    position: Optional[int] = None
    micro_batch: Optional[int] = None  # of the step, on that rank
    epoch: Optional[int] = None
    global_position: Optional[int] = None  # in the epoch's order, all ranks together
