"""``lmpipe trace``: from a training sequence back to its source documents, and from a document to
where it went.

``--step N [--rank R --position P]``: the sequences that step read (the training side maps a step
to token shard rows with the trainer's own order: :mod:`stages.train.trace`, through the
registry), the documents whose segments they hold, and each document's history. ``--doc ID``: the
document's history, and the shard rows that hold it with the steps that read them.

A document's history is its row in every committed output of the pipeline (its variant's
fingerprints say which) that has an ``id`` column: kept, dropped (``drop_reason``) or quarantined
(``quarantine_reason``), with the columns the stage added or changed -- the scores and decisions
it recorded (quality signals, language, dedup cluster, classifier score) -- and, at the source,
the file and line (or row, or WARC record offset). Rows are found through indexes of the ``id``
column built on first use (:mod:`pipeline.trace_index`), so a trace reads a few row groups, not
the corpus.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline import manifest as mf
from pipeline import registry
from pipeline import storage as st
from pipeline.config import LoadedConfig
from pipeline.contracts import TraceError, TracedSequence
from pipeline.stage import stage_seed
from pipeline.trace_index import OutputIndex, read_rows, schema_columns
from pipeline.types import DROP_REASON, QUARANTINE_REASON

# Columns too large to print: the document itself, a raw record, tokens.
BULKY = frozenset({"text", "payload", "raw", "tokens"})
STATUS = {"data": "kept", "rejected": "dropped", "quarantine": "quarantined"}


@dataclass
class StageOutput:
    name: str
    uses: str
    inputs: list[str]
    stage_dir: str
    manifest: Optional[dict[str, Any]]  # None: not committed for these fingerprints


@dataclass
class StageRecord:
    """A document in one stage's output."""

    stage: str
    status: str  # kept, dropped, quarantined, or the dataset's name (a stage with other outputs)
    reason: Optional[str]
    fields: dict[str, Any]  # what the stage added or changed
    file: str
    row: int


@dataclass
class DocumentTrace:
    doc_id: str
    source: Optional[str] = None
    location: Optional[str] = None  # the source file and line / row / byte offset
    stages: list[StageRecord] = field(default_factory=list)
    sequences: list[TracedSequence] = field(default_factory=list)

    @property
    def fate(self) -> str:
        last = self.stages[-1] if self.stages else None
        if last is None:
            return "not found"
        if last.status in ("dropped", "quarantined"):
            return f"{last.status} at {last.stage}" + (f" ({last.reason})" if last.reason else "")
        return f"kept through {last.stage}"

    def to_json(self) -> dict[str, Any]:
        return {"doc_id": self.doc_id, "source": self.source, "location": self.location, "fate": self.fate,
                "stages": [r.__dict__ for r in self.stages],
                "sequences": [s.model_dump(mode="json", by_alias=True) for s in self.sequences]}


class Tracer:
    """The committed outputs of one pipeline variant, and lookups in them."""

    def __init__(self, loaded: LoadedConfig, variant: Optional[str] = None):
        from pipeline.runner import Runner
        from pipeline.variants import BASE, expand_variants, select_variants

        self.path = loaded.path
        variants = expand_variants(loaded) if loaded.declared.variants else None
        self.variant = variant or BASE
        if variants is not None:
            (chosen,) = select_variants(variants, self.variant, loaded.path)
            loaded = chosen.loaded
        elif variant not in (None, BASE):
            raise TraceError(f"{loaded.path}: --variant {variant}: the file has no variants")
        self.loaded = loaded
        self.runner = Runner(loaded, use_ray=False, track=False)
        self.storage, self.work_dir = self.runner.storage, self.runner.work_dir
        self._fingerprints: dict[str, str] = {}
        self.index = OutputIndex(self.storage, self.work_dir)

    def _fingerprint(self, name: str) -> str:
        """A stage's fingerprint, computed only when asked (with its inputs'): a code digest costs
        parsing the stage's modules, and --step needs no stage after the train stage."""
        if name not in self._fingerprints:
            node = self.runner.by_name[name]
            inputs = {r.stage: self._fingerprint(r.stage) for r in node.inputs}
            self._fingerprints[name] = self.runner.fingerprint_of(node, inputs).value
        return self._fingerprints[name]

    @functools.cached_property
    def outputs(self) -> list[StageOutput]:
        """Every stage, in pipeline order (resolving all fingerprints)."""
        return [self.output(n.name) for n in self.runner.order]

    @functools.cache
    def output(self, name: str) -> StageOutput:
        node = self.runner.by_name[name]
        stage_dir = mf.stage_uri(self.work_dir, name, self._fingerprint(name))
        return StageOutput(name, node.cls.name, [r.stage for r in node.inputs], stage_dir, mf.load_manifest(self.storage, stage_dir))

    @property
    def by_name(self) -> dict[str, StageOutput]:
        return {o.name: o for o in self.outputs}

    # -- the training stage ------------------------------------------------------------------------
    def train_stage(self, name: Optional[str]) -> StageOutput:
        nodes = self.runner.by_name
        if name is not None:
            if name not in nodes:
                raise TraceError(f"{self.path}: --stage {name}: no such stage (stages: {', '.join(nodes)})")
            if nodes[name].cls.name != "train":
                raise TraceError(f"{self.path}: --stage {name}: a {nodes[name].cls.name!r} stage, not a train stage")
            return self.output(name)
        trains = [n for n, node in nodes.items() if node.cls.name == "train"]
        if len(trains) != 1:
            found = ", ".join(trains) or "none"
            raise TraceError(f"{self.path}: trace --step and --row read one train stage (found: {found})" + ("; name it with --stage" if trains else ""))
        return self.output(trains[0])

    def committed(self, out: StageOutput, why: str) -> dict[str, Any]:
        if out.manifest is None:
            variant = f" --variant {self.variant}" if self.variant != "base" else ""
            raise TraceError(f"{self.path}: stage {out.name!r} has no committed output for {why} ({out.stage_dir});"
                             f" run `lmpipe run {self.path}{variant}` first")
        return out.manifest

    def _train_args(self, train: StageOutput) -> dict[str, Any]:
        tokenize = self.output(train.inputs[0])
        return dict(train_config=self.loaded.resolved_stage_configs[train.name],
                    seed=stage_seed(self.loaded.resolved.seed, train.name), tokenize_dir=tokenize.stage_dir,
                    tokenize_manifest=self.committed(tokenize, f"the {train.name!r} stage's sequences"), storage=self.storage)

    def ancestors(self, name: str) -> list[StageOutput]:
        """The stages ``name`` reads from, directly or not, in pipeline order."""
        seen, todo = set(), [name]
        while todo:
            for ref in self.runner.by_name[todo.pop()].inputs:
                if ref.stage not in seen:
                    seen.add(ref.stage)
                    todo.append(ref.stage)
        return [self.output(n.name) for n in self.runner.order if n.name in seen]

    # -- questions ---------------------------------------------------------------------------------
    def step(self, step: int, rank: Optional[int], position: Optional[int], stage: Optional[str] = None) -> dict[str, Any]:
        train = self.train_stage(stage)
        sequences = registry.trace_step(**self._train_args(train), step=step, rank=rank, position=position)
        return self._sequences_answer(train, f"step {step}", sequences)

    def row(self, shard: str, row: int, stage: Optional[str] = None) -> dict[str, Any]:
        """A token shard row: its documents, and every step that read it."""
        train = self.train_stage(stage)
        sequences = registry.trace_row(**self._train_args(train), shard=shard, row=row)
        return self._sequences_answer(train, f"shard {shard} row {row}", sequences)

    def _sequences_answer(self, train: StageOutput, question: str, sequences: list[TracedSequence]) -> dict[str, Any]:
        doc_ids = list(dict.fromkeys(seg.doc_id for s in sequences for seg in s.segments))
        documents = self.histories(doc_ids, self.ancestors(train.name))
        return {"pipeline": self.loaded.resolved.name, "variant": self.variant, "train_stage": train.name,
                "train_dir": train.stage_dir, "trained": train.manifest is not None,
                "question": question, "sequences": sequences, "documents": documents}

    def document(self, doc_id: str) -> dict[str, Any]:
        (doc,) = self.histories([doc_id], self.outputs)
        if not doc.stages:
            searched = [o.name for o in self.outputs if o.manifest is not None]
            raise TraceError(f"{self.path}: document {doc_id!r} is in no committed output of variant {self.variant}"
                             f" (searched: {', '.join(searched) or 'nothing is committed yet'})")
        trains = [o for o in self.outputs if o.uses == "train"]
        for tokenize in [o for o in self.outputs if o.uses == "tokenize" and o.manifest is not None]:
            train = next((t for t in trains if t.inputs and t.inputs[0] == tokenize.name), None)
            args = self._train_args(train) if train else dict(train_config=None, seed=0, tokenize_dir=tokenize.stage_dir,
                                                                tokenize_manifest=tokenize.manifest, storage=self.storage)
            doc.sequences += registry.trace_document_sequences(**args, doc_id=doc_id, lookup=self.index.lookup)
        doc.sequences.sort(key=lambda s: (s.split != "train", s.seq_id, s.step or 0))  # seq_id order: the document's own
        return {"pipeline": self.loaded.resolved.name, "variant": self.variant, "document": doc,
                "tokenized_by": [o.name for o in self.outputs if o.uses == "tokenize" and o.manifest is not None],
                "trained_by": [t.name for t in trains]}

    def histories(self, doc_ids: list[str], stages: list[StageOutput]) -> list[DocumentTrace]:
        """Each document's row in every committed output (of ``stages``) that has an ``id`` column."""
        docs = {d: DocumentTrace(d) for d in doc_ids}
        last_row: dict[tuple[str, str], dict[str, Any]] = {}  # (stage, doc) -> its row there
        for out in stages:
            if out.manifest is None:
                continue
            for dataset in out.manifest["datasets"]:
                if "id" not in schema_columns(out.manifest, dataset):
                    continue
                found = self.index.lookup(out.stage_dir, out.manifest, dataset, "id", doc_ids)
                wanted = [(doc_id, place) for doc_id, places in found.items() for place in places[:1]]
                rows = read_rows(self.storage, [p for _, p in wanted])
                for (doc_id, (file, row)), record in zip(wanted, rows):
                    before = next((last_row[(s, doc_id)] for s in out.inputs if (s, doc_id) in last_row), None)
                    reason = record.get(DROP_REASON) or record.get(QUARANTINE_REASON)
                    trace = docs[doc_id]
                    trace.stages.append(StageRecord(out.name, STATUS.get(dataset, dataset), reason, _changes(before, record), file, row))
                    last_row[(out.name, doc_id)] = record
                    if trace.location is None:
                        trace.source = record.get("source")
                        trace.location = source_location(out.manifest, record)
        return list(docs.values())


def _changes(before: Optional[dict[str, Any]], after: dict[str, Any]) -> dict[str, Any]:
    """The columns a stage added or changed (its scores and decisions); a rewritten text as its length."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        if key in (DROP_REASON, QUARANTINE_REASON, "id"):
            continue
        if key in BULKY:
            if before is not None and key in before and before[key] != value and isinstance(value, str):
                out[f"{key}_chars"] = f"{len(before[key])} -> {len(value)}"
            continue
        if before is None or key not in before or before[key] != value:
            out[key] = value
    return out


_ORIGIN = re.compile(r"^(?P<file>.*?)(?P<kind>[:#@])(?P<at>\d+)$")


def source_location(manifest: dict[str, Any], record: dict[str, Any]) -> Optional[str]:
    """The source file (as the source stage read it) and the place in it: line, element/row, or
    the byte offset of a WARC record."""
    origin = record.get("origin")
    if origin is None and record.get("file") is not None:  # a quarantined record names file and line
        origin = f"{record['file']}:{record.get('line')}"
    if not origin:
        return None
    m = _ORIGIN.match(origin)
    relpath, what = (m.group("file"), {":": "line {}", "#": "#{}", "@": "byte {}"}[m.group("kind")].format(m.group("at"))) if m else (origin, "")
    uri = next((f["uri"] for e in manifest.get("external_inputs", []) for f in e.get("files", []) if f.get("relpath") == relpath), relpath)
    if m and m.group("kind") == "@" and record.get("warc_record_id"):
        what += f" (WARC record {record['warc_record_id']})"
    return f"{uri} {what}".strip()


# -- output ----------------------------------------------------------------------------------------

def to_json(answer: dict[str, Any]) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, DocumentTrace):
            return value.to_json()
        if isinstance(value, TracedSequence):
            return value.model_dump(mode="json", by_alias=True)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return json.dumps({k: plain(v) for k, v in answer.items()}, indent=2, default=str)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _fields(fields: dict[str, Any], indent: str, width: int = 110) -> list[str]:
    lines, line = [], ""
    for k, v in fields.items():
        item = f"{k}={_value(v)}"
        if line and len(indent) + len(line) + 2 + len(item) > width:
            lines.append(indent + line)
            line = item
        else:
            line = f"{line}  {item}" if line else item
    if line:
        lines.append(indent + line)
    return lines


def _sequence_line(s: TracedSequence, trained: bool = True) -> str:
    where = f"{s.split} shard {s.shard} row {s.row} (seq_id {s.seq_id}, source {s.source})"
    if s.step is None:
        return where + (": not read by training" if s.split == "train" and trained else "")
    return (f"step {s.step} rank {s.rank} position {s.position} (micro-batch {s.micro_batch}, epoch {s.epoch},"
            f" global position {s.global_position}): {where}")


def _document_lines(doc: DocumentTrace) -> list[str]:
    lines = [f"document {doc.doc_id}  {doc.source or ''}  {doc.location or ''}".rstrip()]
    for r in doc.stages:
        status = r.status + (f": {r.reason}" if r.reason else "")
        lines.append(f"  {r.stage:<18} {status}")
        lines += _fields({k: v for k, v in r.fields.items() if v is not None}, "      ")  # --json keeps the nulls
    lines.append(f"  => {doc.fate}")
    return lines


def format_text(answer: dict[str, Any]) -> str:
    head = f"{answer['pipeline']} (variant {answer['variant']})"
    lines: list[str] = []
    if "sequences" in answer:
        trained = "" if answer["trained"] else " -- not trained yet: the order it will read"
        lines.append(f"{head}: {answer['question']} of {answer['train_stage']} ({answer['train_dir']}){trained}")
        for s in answer["sequences"]:
            lines.append(_sequence_line(s))
            for seg in s.segments:
                lines.append(f"    tokens {seg.start:>5}-{seg.start + seg.tokens - 1:<5} document {seg.doc_id} (copy {seg.copy_})")
        lines.append("")
        for doc in answer["documents"]:
            lines += _document_lines(doc) + [""]
    else:
        doc = answer["document"]
        lines.append(f"{head}:")
        lines += _document_lines(doc)
        trained = bool(answer.get("trained_by"))
        if doc.sequences:
            reads = [s for s in doc.sequences if s.step is not None]
            rows = {(s.shard, s.row) for s in doc.sequences}
            said = f"read {len(reads)} time(s) by training" if trained else "no train stage reads them"
            lines.append(f"  in {len(rows)} token sequence(s), {said}:")
            for s in doc.sequences:
                seg = next(g for g in s.segments if g.doc_id == doc.doc_id)
                lines.append(f"    {_sequence_line(s, trained)}; tokens {seg.start}-{seg.start + seg.tokens - 1} (copy {seg.copy_})")
        elif answer.get("tokenized_by") and doc.fate.startswith("kept"):
            lines.append(f"  in no token sequence of {', '.join(answer['tokenized_by'])} (its source has no share in the"
                         f" mixture, or its last tokens fell in the tail a split drops)")
    return "\n".join(lines).rstrip() + "\n"
