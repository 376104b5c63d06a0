"""Decontaminate: remove evaluation-set text from the training corpus (GPT-3's 13-gram rule, or
Dolma's paragraph-level exact match with ``match: paragraph``).

The driver builds one n-gram index over the configured evaluation tasks (see
:mod:`stages.decontaminate.ngrams`), writes it as a few memory-mappable files under the attempt
folder, and every worker maps the same files (shared through the page cache; 8 bytes per distinct
n-gram plus the eval vocabulary). Each document is checked against it; a match

* ``mode: drop`` rejects the document (``drop_reason = contaminated``);
* ``mode: redact`` removes each matching span with ``redact_margin`` characters on both sides,
  drops fragments shorter than ``min_fragment_chars``, and rejects the document if it was split
  more than ``max_splits`` times (``contaminated_split``) or nothing is left
  (``contaminated_fully_redacted``).

Every matching row (kept-redacted or rejected) records ``contaminated_examples`` (``task:id``),
``contaminated_tasks`` and the characters matched and removed; a per-task contamination report
(documents, characters, examples found, sources) is logged as an artifact and as metrics.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Literal, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline import storage as st
from pipeline.config import StrictModel
from pipeline.context import ExternalInput, PartContext, StageContext
from pipeline.contracts import PartResult
from pipeline.io import iter_parquet_batches, read_table
from pipeline.registry import register
from pipeline.stage import DROP_REASON, PART_WRITERS, DatasetStage, Part, Resources
from stages.decontaminate.ngrams import NgramIndex, split_words, token_spans, word_ids
from stages.evalsets import TaskSpec, builtin_source, load_task, task_spec
from stages.summaries.decontaminate import DecontaminateSummary, TaskContamination

CONTAMINATED = "contaminated"
CONTAMINATED_SPLIT = "contaminated_split"
CONTAMINATED_FULLY_REDACTED = "contaminated_fully_redacted"
INDEX_FOLDER = "_index"

ADDED_COLUMNS = {
    "contaminated_tasks": pa.list_(pa.string()),
    "contaminated_examples": pa.list_(pa.string()),
    "contaminated_chars": pa.int64(),  # characters of the input covered by matching n-grams
    "redacted_chars": pa.int64(),  # characters removed (redact mode)
}


class DecontaminateConfig(StrictModel):
    tasks: list[Union[str, TaskSpec]] = Field(min_length=1, description="evaluation tasks: built-in names (mmlu) or {name, path}")
    match: Literal["ngram", "paragraph"] = Field(
        default="ngram", description="ngram: GPT-3's n-gram overlap; paragraph: Dolma's exact match of whole paragraphs (lines)"
    )
    min_paragraph_words: int = Field(default=13, ge=1, description="paragraph match: paragraphs with fewer words are ignored on both sides")
    n: int = Field(default=13, ge=3, le=64, description="words per n-gram")
    min_words: Optional[int] = Field(
        default=8, ge=3, description="eval texts shorter than n words but at least this long are matched as a whole (None: ignore them)"
    )
    max_examples_per_ngram: int = Field(default=10, ge=1, description="ignore n-grams found in more eval examples than this (too common)")
    mode: Literal["drop", "redact"] = "drop"
    redact_margin: int = Field(default=200, ge=0, description="characters removed on both sides of a match")
    min_fragment_chars: int = Field(default=200, ge=0, description="redacted fragments shorter than this are dropped")
    max_splits: int = Field(default=10, ge=0, description="a document split more often than this is dropped")
    batch_rows: int = Field(default=2048, ge=1)


def redact(text: str, spans: list[tuple[int, int]], margin: int, min_fragment: int) -> tuple[list[str], int]:
    """GPT-3's redaction: cut each span +- margin, keep fragments >= min_fragment chars.
    Returns (kept fragments, number of cuts)."""
    cuts: list[list[int]] = []
    for s, e in sorted(spans):
        s, e = max(0, s - margin), min(len(text), e + margin)
        if cuts and s <= cuts[-1][1]:
            cuts[-1][1] = max(cuts[-1][1], e)
        else:
            cuts.append([s, e])
    pieces, last = [], 0
    for s, e in cuts:
        pieces.append(text[last:s])
        last = e
    pieces.append(text[last:])
    return [p for p in pieces if len(p) >= min_fragment and p.strip()], len(cuts)


@register
class Decontaminate(DatasetStage):
    name = "decontaminate"
    version = "1"
    description = "Drop or redact documents that contain evaluation-set n-grams (GPT-3 rule) or paragraphs (Dolma); contamination report per task."
    Config = DecontaminateConfig
    requires = ("id", "text", "source")
    produces = tuple(ADDED_COLUMNS)
    outputs = ("data", "rejected")
    row_preserving = True
    resources = Resources(num_cpus=1, actors=True)
    writes_through = PART_WRITERS  # the rows are routed through ctx.run_parts
    libraries = ("pyarrow", "numpy")
    Summary = DecontaminateSummary

    def __init__(self, config: DecontaminateConfig, seed: int = 0):
        super().__init__(config, seed)
        self._index: Optional[NgramIndex] = None
        self._index_uri: Optional[str] = None

    # -- driver ----------------------------------------------------------------------------------
    def _tasks(self, storage: Any):
        return [load_task(t, storage) for t in self.config.tasks]

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        out = []
        for spec in (task_spec(t) for t in self.config.tasks):
            if spec.path is None:
                path, ident = builtin_source(spec.name)
                out.append(ExternalInput(f"evalset:{spec.name}", path, (ident,)))
            else:
                ident = ctx.storage.file_identity(spec.path)
                out.append(ExternalInput(f"evalset:{spec.name}", spec.path, ({"uri": spec.path, **ident},)))
        return out

    def run(self, ctx: StageContext) -> None:
        import time

        t0 = time.perf_counter()
        c = self.config
        if c.match == "paragraph":
            index = NgramIndex.build_paragraphs(self._tasks(ctx.storage), c.min_paragraph_words, c.max_examples_per_ngram)
        else:
            index = NgramIndex.build(self._tasks(ctx.storage), c.n, c.min_words, c.max_examples_per_ngram)
        index_uri = st.join(ctx.attempt_uri, INDEX_FOLDER)
        index.save(ctx.storage, index_uri)
        build_seconds = time.perf_counter() - t0
        parts = [Part(f"{i:05d}", {"uri": uri, "index": index_uri}) for i, uri in enumerate(ctx.inputs[0].files())]
        results = ctx.run_parts(parts)
        report = self._report(ctx, index, results)
        report["index"] = {**index.stats, "build_seconds": round(build_seconds, 3)}
        ctx.log_artifact("contamination_report.json", json.dumps(report, indent=2, sort_keys=True))
        ctx.log_metric("decontam_index_bytes", index.nbytes)
        ctx.log_metric("decontam_index_ngrams", len(index.hashes))
        for task, r in report["tasks"].items():
            for key in ("docs", "chars", "examples_found", "docs_rejected", "docs_redacted"):
                ctx.log_metric(f"contamination.{task}.{key}", r[key])
        ctx.set_summary(DecontaminateSummary(
            index_path=st.join(ctx.attempt, INDEX_FOLDER),
            index_bytes=int(index.nbytes),
            tasks={t: TaskContamination(**{k: v for k, v in r.items() if k != "example_ids"}) for t, r in report["tasks"].items()},
        ))

    def _report(self, ctx: StageContext, index: NgramIndex, results: list[PartResult]) -> dict[str, Any]:
        cols = ["source", "contaminated_tasks", "contaminated_examples", "contaminated_chars", "redacted_chars"]
        tables = []
        for r in results:
            for ds in ("data", "rejected"):
                files = [st.join(ctx.stage_dir, f.path) for f in r.files.get(ds, [])]
                if files:
                    t = read_table(ctx.storage, files, cols)
                    t = t.filter(pc.is_valid(t.column("contaminated_tasks")))
                    tables.append(t.append_column("dataset", pa.array([ds] * t.num_rows, pa.string())))
        tasks: dict[str, Any] = {}
        for name, stats in index.stats["tasks"].items():
            tasks[name] = {"examples": stats["examples"], "examples_indexed": stats["examples_indexed"], "docs": 0, "chars": 0,
                           "docs_rejected": 0, "docs_redacted": 0, "examples_found": 0, "example_ids": [], "sources": {}}
        found: dict[str, set] = {t: set() for t in tasks}
        for t in tables:
            for row in t.to_pylist():
                for task in row["contaminated_tasks"]:
                    r = tasks[task]
                    r["docs"] += 1
                    r["chars"] += row["contaminated_chars"] or 0
                    r["docs_rejected" if row["dataset"] == "rejected" else "docs_redacted"] += 1
                    r["sources"][row["source"]] = r["sources"].get(row["source"], 0) + 1
                for ex in row["contaminated_examples"]:
                    task, ex_id = ex.split(":", 1)
                    found[task].add(ex_id)
        for name, r in tasks.items():
            r["example_ids"] = sorted(found[name])
            r["examples_found"] = len(found[name])
            r["fraction_found"] = r["examples_found"] / max(r["examples"], 1)
        return {"mode": self.config.mode, "match": self.config.match, "n": self.config.n, "tasks": tasks}

    # -- workers ---------------------------------------------------------------------------------
    def _load_index(self, storage: st.Storage, uri: str) -> NgramIndex:
        if self._index_uri != uri:  # once per actor
            self._index = NgramIndex.load(storage, uri)
            self._index_uri = uri
        return self._index

    def process_part(self, part: Part, ctx: PartContext) -> Iterator[pa.Table]:
        index = self._load_index(ctx.storage, part.payload["index"])
        uri = part.payload["uri"]
        ctx.count("bytes_in", ctx.storage.size(uri))
        for batch in iter_parquet_batches(ctx.storage, uri, self.config.batch_rows):
            ctx.count("rows_in", batch.num_rows)
            yield self.check_batch(batch, index)

    def check_batch(self, batch: pa.Table, index: NgramIndex) -> pa.Table:
        """Add the contamination columns and ``drop_reason`` to one batch (every row kept once)."""
        texts = batch.column("text").combine_chunks()
        n = batch.num_rows
        cols: dict[str, list] = {name: [None] * n for name in ADDED_COLUMNS}
        reasons: list[Optional[str]] = [None] * n
        new_text: Optional[list] = None
        for i, text, (spans, examples) in self._matches(texts, index):
            cols["contaminated_examples"][i] = [f"{index.examples[e][0]}:{index.examples[e][1]}" for e in examples]
            cols["contaminated_tasks"][i] = sorted({index.examples[e][0] for e in examples})
            covered = _union_length(spans)
            cols["contaminated_chars"][i] = covered
            if self.config.mode == "drop":
                reasons[i] = CONTAMINATED
                continue
            pieces, cuts = redact(text, spans, self.config.redact_margin, self.config.min_fragment_chars)
            if cuts > self.config.max_splits:
                reasons[i] = CONTAMINATED_SPLIT
            elif not pieces:
                reasons[i] = CONTAMINATED_FULLY_REDACTED
            else:
                if new_text is None:
                    new_text = texts.to_pylist()
                redacted = "\n\n".join(pieces)
                new_text[i] = redacted
                cols["redacted_chars"][i] = len(text) - len(redacted)
        out = batch
        if new_text is not None:
            out = out.set_column(out.column_names.index("text"), "text", pa.array(new_text, pa.string()))
        for name, typ in ADDED_COLUMNS.items():
            out = out.append_column(name, pa.array(cols[name], typ))
        return out.append_column(DROP_REASON, pa.array(reasons, pa.string()))

    def _matches(self, texts: pa.Array, index: NgramIndex) -> Iterator[tuple[int, str, tuple[list[tuple[int, int]], list[int]]]]:
        """(row, text, (character spans, eval examples)) of every contaminated row, in row order.
        One vectorised pass over the batch finds the candidates; only those are looked at in Python."""
        if index.kind == "paragraph":
            doc_of, rows, line, line_offsets = index.paragraph_hits(texts)
            for i in np.unique(doc_of).tolist():
                text = texts[i].as_py()
                starts = np.concatenate([[0], np.cumsum([len(p) + 1 for p in text.split("\n")])])
                mine = doc_of == i
                spans = [(int(starts[k]), int(starts[k + 1] - 1)) for k in (line[mine] - line_offsets[i]).tolist()]
                yield i, text, (spans, index.examples_of(rows[mine]).tolist())
            return
        words, offsets = split_words(texts)
        ids = word_ids(words, index.vocab)
        candidates: set[int] = set()
        for where, _k, _rows in index.hits(ids, offsets):
            candidates.update((np.searchsorted(offsets, where, side="right") - 1).tolist())
        for i in sorted(candidates):
            text = texts[i].as_py()
            match = self.match_document(text, index)
            if match is not None:
                yield i, text, match

    @staticmethod
    def match_document(text: str, index: NgramIndex) -> Optional[tuple[list[tuple[int, int]], list[int]]]:
        """Character spans of matching n-grams and the eval examples they belong to (None: clean)."""
        spans_of_words, words = token_spans(text)
        ids = word_ids(words, index.vocab)
        offsets = np.array([0, len(ids)], dtype=np.int64)
        spans, rows = [], []
        for where, k, idx_rows in index.hits(ids, offsets):
            for w in where.tolist():
                spans.append((spans_of_words[w][0], spans_of_words[w + k - 1][1]))
            rows.append(idx_rows)
        if not spans:
            return None
        return spans, index.examples_of(np.concatenate(rows)).tolist()


def _union_length(spans: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for s, e in sorted(spans):
        if s >= end:
            total += e - s
        elif e > end:
            total += e - end
        end = max(end, e)
    return total
