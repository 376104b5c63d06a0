"""Ingest: JSONL (plain, .gz, .zst), JSON arrays, Parquet and folders of them or of text files; local or s3://.

Output rows: ``id`` (stable: source + file + line/row/element), ``text``, ``source``, ``metadata``
(JSON of the remaining fields), ``url`` and ``origin`` (``file:line`` for JSONL lines and Parquet
rows, ``file#n`` for text files (n = 0) and JSON array elements (n = element index); lineage).
Malformed records go to the ``quarantine`` dataset with ``file``/``line``, a reason and the raw bytes;
a file that cannot be read to its end (truncated or corrupt .gz/.zst, damaged Parquet) keeps what was
read and adds one ``unreadable_file`` record saying where it stopped.

A part holds at most ``max_part_bytes`` of text whatever the input's layout (see
:mod:`stages.ingest.planning`): a big file is read as several parts, a compressed stream as one part
whose output files roll over at the bound.

Nothing is dropped silently: a folder is read by the formats of the files it holds (and refused at
plan time when it holds none), and a source that yields no documents -- no records at all, or every
record quarantined -- fails the stage unless the source sets ``allow_empty: true``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import pyarrow as pa

from pipeline import storage as st
from pipeline.contracts import Manifest
from pipeline.context import ExternalInput, PartContext, StageContext
from pipeline.registry import register
from pipeline.stage import QUARANTINE_REASON, Part, Resources, SourceStage
from stages.ingest.config import IngestConfig, SourceConfig
from stages.ingest.decompress import is_compressed
from stages.ingest.identity import CONTENT, content_identity
from stages.ingest.listing import expand_source, short_list, source_files
from stages.ingest.planning import LineSpan, RowGroupSpan, line_spans, row_group_spans
from stages.ingest.readers import read_json, read_jsonl, read_parquet, read_text_file

log = logging.getLogger("lmpipe")


def _source_counter(name: str, what: str) -> str:
    """Per-source counters in the manifest (``source:<name>:kept`` ...): what check() judges each source by."""
    return f"source:{name}:{what}"


def _counted(tables: Iterator[pa.Table], ctx: PartContext, source: str) -> Iterator[pa.Table]:
    for t in tables:
        if QUARANTINE_REASON in t.column_names:
            reasons: dict[str, int] = {}
            for r in t.column(QUARANTINE_REASON).to_pylist():
                reasons[r] = reasons.get(r, 0) + 1
            for r, n in sorted(reasons.items()):
                ctx.count(_source_counter(source, f"quarantined:{r}"), n)
        else:
            ctx.count(_source_counter(source, "kept"), t.num_rows)
        yield t


@register
class Ingest(SourceStage):
    name = "ingest"
    version = "2"
    description = "Read JSONL(.gz/.zst), JSON arrays, Parquet and folders of them or of text files (local or s3://) into id/text/source/metadata rows."
    Config = IngestConfig
    produces = ("id", "text", "source", "metadata", "url", "origin")
    resources = Resources(num_cpus=1)

    def _files(self, storage: st.Storage) -> list[tuple[int, str, str, str]]:
        out = []
        for si, source in enumerate(self.config.sources):
            files, skipped = source_files(storage, source)
            by_reason: dict[str, list[str]] = {}
            for path, reason in skipped:
                by_reason.setdefault(reason, []).append(path)
            for reason, paths in by_reason.items():
                log.warning("[ingest] source %r: %d entr%s skipped, %s: %s", source.name, len(paths),
                            "y" if len(paths) == 1 else "ies", reason, short_list(paths, 5))
            for uri, rel, fmt in files:
                out.append((si, uri, rel, fmt))
        return out

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        result = []
        for source in self.config.sources:
            files = []
            for uri, rel, _fmt in expand_source(ctx.storage, source):
                version = content_identity(ctx.storage, uri, ctx.work_dir) if source.identity == CONTENT else ctx.storage.file_identity(uri)
                files.append({"uri": uri, "relpath": rel, **version})
            result.append(ExternalInput(source.name, source.paths[0] if len(source.paths) == 1 else ",".join(source.paths), tuple(files),
                                        identity=source.identity))
        return result

    def plan(self, ctx: StageContext) -> list[Part]:
        """Parts of at most ``max_part_bytes`` of text where the input allows it: an uncompressed
        JSONL file above the bound in byte ranges cut at line boundaries, a Parquet file above a
        quarter of it in runs of row groups (its footer says how big they are uncompressed), text
        files grouped up to it; any other file is one part (its output files roll over at the
        bound). A file within the bound is one part, with the id it always had."""
        bound = self.config.max_part_bytes
        parts: list[Part] = []
        group: list[list[str]] = []
        group_bytes = 0
        group_source = -1

        def flush_group() -> None:
            nonlocal group, group_bytes
            if group:
                parts.append(Part(f"{len(parts):05d}", {"uri": group[0][0], "files": group, "source": group_source, "format": "text"}))
                group, group_bytes = [], 0

        for si, uri, rel, fmt in self._files(ctx.storage):
            if fmt != "text" or si != group_source:
                flush_group()
            if fmt == "text":
                size = ctx.storage.size(uri)
                if group and group_bytes + size > bound:
                    flush_group()
                group_source = si
                group.append([uri, rel])
                group_bytes += size
                if len(group) >= self.config.text_files_per_part or group_bytes >= bound:
                    flush_group()
                continue
            group_source = -1
            payload = {"uri": uri, "relpath": rel, "source": si, "format": fmt}
            for span in self._spans(ctx, uri, fmt, bound):
                parts.append(Part(f"{len(parts):05d}", {**payload, **span}))
        flush_group()
        return parts

    @staticmethod
    def _spans(ctx: StageContext, uri: str, fmt: str, bound: int) -> list[dict[str, Any]]:
        """The part payloads' spans of one file (``[{}]``: the whole file, one part)."""
        if fmt == "jsonl" and not is_compressed(uri):
            size = ctx.storage.size(uri)
            if size > bound:
                return [{"span": [s.start, s.end, s.first_line]} for s in line_spans(ctx.storage, uri, size, bound, ctx.fan_out)]
        elif fmt == "parquet" and ctx.storage.size(uri) > bound // 4:
            spans = row_group_spans(ctx.storage, uri, bound)
            if spans is not None and len(spans) > 1:
                return [{"row_groups": [s.first, s.stop, s.first_row]} for s in spans]
        return [{}]

    def read_part(self, part: Part, ctx: PartContext) -> Iterator[pa.Table]:
        source = self.config.sources[part.payload["source"]]
        yield from _counted(self._read_part(part, ctx, source), ctx, source.name)

    def output_file_bytes(self) -> int:
        return self.config.max_part_bytes

    def _read_part(self, part: Part, ctx: PartContext, source: SourceConfig) -> Iterator[pa.Table]:
        fmt = part.payload["format"]
        if fmt == "text":
            for uri, rel in part.payload["files"]:
                ctx.count("bytes_in", ctx.storage.size(uri))
                ctx.count("files")
                ctx.count(_source_counter(source.name, "files"))
                yield from read_text_file(ctx.storage, uri, rel, source)
            return
        uri, rel = part.payload["uri"], part.payload["relpath"]
        line_span = LineSpan(*part.payload["span"]) if "span" in part.payload else None
        group_span = RowGroupSpan(*part.payload["row_groups"]) if "row_groups" in part.payload else None
        first_piece = (line_span is None or line_span.start == 0) and (group_span is None or group_span.first == 0)
        if line_span is not None:
            ctx.count("bytes_in", line_span.end - line_span.start)
        elif first_piece:  # a file read in runs of row groups counts its size once
            ctx.count("bytes_in", ctx.storage.size(uri))
        if first_piece:
            ctx.count("files")
            ctx.count(_source_counter(source.name, "files"))
        if fmt == "jsonl":
            yield from read_jsonl(ctx.storage, uri, rel, source, self.config.batch_rows, ctx, line_span)
        elif fmt == "json":
            yield from read_json(ctx.storage, uri, rel, source, self.config.batch_rows, ctx)
        else:
            yield from read_parquet(ctx.storage, uri, rel, source, self.config.batch_rows, group_span)

    def check(self, manifest: Manifest) -> None:
        counts = manifest.counts
        counters = manifest.counters
        for source in self.config.sources:
            if source.allow_empty:
                continue
            kept = int(counters.get(_source_counter(source.name, "kept"), 0))
            if kept:
                continue
            prefix = _source_counter(source.name, "quarantined:")
            reasons = {k[len(prefix):]: int(v) for k, v in counters.items() if k.startswith(prefix)}
            files = int(counters.get(_source_counter(source.name, "files"), 0))
            if reasons:
                bad = sum(reasons.values())
                top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
                listed = ", ".join(f"{k}: {v}" for k, v in top[:3]) + (", ..." if len(top) > 3 else "")
                raise ValueError(
                    f"ingest: source {source.name!r}: all {bad} records were quarantined ({listed}), none kept;"
                    f" check its files and field mapping (text_field: {source.text_field!r}), see the quarantine dataset"
                    f" of this attempt ({manifest.attempt}) for file, line and detail, or set allow_empty: true on the"
                    f" source to accept it"
                )
            raise ValueError(
                f"ingest: source {source.name!r} yielded no documents: its {files} file(s) hold no records (empty or blank);"
                f" check its paths ({', '.join(source.paths)}), or set allow_empty: true on the source if that is expected"
            )
        limit = self.config.max_bad_fraction
        bad = sum(counts.quarantined.values())
        if limit is not None and counts.rows_in and bad / counts.rows_in > limit:
            reasons_text = ", ".join(f"{k}: {v}" for k, v in counts.quarantined.items())
            raise ValueError(
                f"ingest: {bad} of {counts.rows_in} records ({bad / counts.rows_in:.1%}) were quarantined,"
                f" above max_bad_fraction={limit} ({reasons_text}); see the quarantine dataset of this attempt"
                f" ({manifest.attempt}) for file, line and detail"
            )
