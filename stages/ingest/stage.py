"""Ingest: JSONL (plain, .gz, .zst), Parquet and folders of text files, local or s3://.

Output rows: ``id`` (stable: source + file + line/row), ``text``, ``source``, ``metadata`` (JSON
of the remaining fields), ``url`` and ``origin`` (``file:line`` for lineage). Malformed records
go to the ``quarantine`` dataset with ``file``/``line``, a reason and the raw bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import re
from typing import Any, Iterator, Literal, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from pipeline import storage as st
from pipeline.config import PathStr, StrictModel
from pipeline.context import ExternalInput, PartContext, StageContext
from pipeline.registry import register
from pipeline.stage import QUARANTINE_REASON, Part, Resources, SourceStage

DATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("metadata", pa.string()),
        ("url", pa.string()),
        ("origin", pa.string()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("file", pa.string()),
        ("line", pa.int64()),
        (QUARANTINE_REASON, pa.string()),
        ("detail", pa.string()),
        ("raw", pa.binary()),
    ]
)
# Quarantine reasons (stable names: users filter on them).
INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
INVALID_UNICODE = "invalid_unicode"  # e.g. lone surrogates from a JSON \ud800 escape
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT = "missing_text"
NON_STRING_TEXT = "non_string_text"
EMPTY_TEXT = "empty_text"
UNREADABLE_FILE = "unreadable_file"

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz", ".jsonl.zst", ".ndjson.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".txt", ".md", ".text")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class SourceConfig(StrictModel):
    name: str = Field(description="source name recorded in every row (e.g. 'news')")
    paths: list[PathStr] = Field(min_length=1, description="files, folders or globs; local or s3://")
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    text_field: str = "text"
    url_field: Optional[str] = "url"
    metadata_fields: Optional[list[str]] = Field(default=None, description="fields kept in metadata (default: all others)")
    text_glob: str = Field(default="**/*.txt", description="files read from a folder in text format")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '_', '.', '-'")
        return v


class IngestConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1)
    max_bad_fraction: Optional[float] = Field(default=None, ge=0, le=1, description="fail if quarantined/read exceeds this")
    batch_rows: int = Field(default=4096, ge=1, description="rows per Arrow batch while reading")
    text_files_per_part: int = Field(default=1000, ge=1, description="text files read by one task")

    @field_validator("sources")
    @classmethod
    def _unique(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        seen = set()
        for s in sources:
            if s.name in seen:
                raise ValueError(f"source name {s.name!r} appears twice")
            seen.add(s.name)
        return sources


def doc_id(source: str, relpath: str, locator: int) -> str:
    """Stable, corpus-unique id: hash of source name, file path (relative to its source root) and line/row."""
    return hashlib.sha1(f"{source}\x00{relpath}\x00{locator}".encode()).hexdigest()[:20]


def _glob_base(pattern: str) -> str:
    """The folder part of a pattern before its first wildcard: relative paths are taken from it."""
    parts = pattern.split("/")
    for i, p in enumerate(parts):
        if any(ch in p for ch in "*?["):
            return "/".join(parts[:i])
    return posixpath.dirname(pattern.rstrip("/")) if "://" in pattern else os.path.dirname(pattern.rstrip("/"))


def _relpath(uri: str, base: str) -> str:
    base = base.rstrip("/")
    if base and uri.startswith(base + "/"):
        return uri[len(base) + 1 :]
    return uri.rsplit("/", 1)[-1]


def detect_format(uri: str) -> str:
    low = uri.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(TEXT_SUFFIXES):
        return "text"
    raise ValueError(f"{uri}: cannot tell the format from the name; set format: jsonl|parquet|text on the source")


def expand_source(storage: st.Storage, source: SourceConfig) -> list[tuple[str, str]]:
    """(file uri, path relative to its source root) for every file of a source, sorted."""
    files: list[tuple[str, str]] = []
    for pattern in source.paths:
        matches = storage.glob(pattern)
        if not matches:
            raise FileNotFoundError(f"source {source.name!r}: {pattern} matches no file")
        for m in matches:
            if storage.isdir(m):
                for f in storage.find_files(m):
                    rel = _relpath(f, m)
                    if source.format == "text" or (source.format == "auto" and _matches_text_glob(rel, source.text_glob)):
                        files.append((f, rel))
                    elif source.format in ("jsonl", "parquet"):
                        files.append((f, rel))
            else:
                files.append((m, _relpath(m, _glob_base(pattern))))
    seen: set[str] = set()
    unique = []
    for f, rel in files:
        if f not in seen:
            seen.add(f)
            unique.append((f, rel))
    return sorted(unique)


def _matches_text_glob(rel: str, pattern: str) -> bool:
    import fnmatch

    if pattern.startswith("**/"):
        return fnmatch.fnmatch(rel, pattern[3:]) or fnmatch.fnmatch(rel, pattern)
    return fnmatch.fnmatch(rel, pattern)


class _Batcher:
    """Collects good rows and quarantined records; emits Arrow tables of bounded size."""

    def __init__(self, source: str, relpath: str, batch_rows: int):
        self.source = source
        self.relpath = relpath
        self.batch_rows = batch_rows
        self.good: dict[str, list] = {k: [] for k in DATA_SCHEMA.names}
        self.bad: dict[str, list] = {k: [] for k in QUARANTINE_SCHEMA.names}

    def add(self, locator: int, text: str, metadata: str, url: Optional[str], origin_kind: str = "line") -> None:
        g = self.good
        g["id"].append(doc_id(self.source, self.relpath, locator))
        g["text"].append(text)
        g["source"].append(self.source)
        g["metadata"].append(metadata)
        g["url"].append(url)
        g["origin"].append(f"{self.relpath}:{locator}" if origin_kind == "line" else f"{self.relpath}#{locator}")

    def quarantine(self, locator: int, reason: str, detail: str, raw: bytes) -> None:
        b = self.bad
        b["id"].append(doc_id(self.source, self.relpath, locator))
        b["source"].append(self.source)
        b["file"].append(self.relpath)
        b["line"].append(locator)
        b[QUARANTINE_REASON].append(reason)
        b["detail"].append(detail[:1000])
        b["raw"].append(raw)

    def full(self) -> bool:
        return len(self.good["id"]) >= self.batch_rows or len(self.bad["id"]) >= self.batch_rows

    def flush(self) -> Iterator[pa.Table]:
        if self.good["id"]:
            yield pa.table(self.good, schema=DATA_SCHEMA)
            self.good = {k: [] for k in DATA_SCHEMA.names}
        if self.bad["id"]:
            yield pa.table(self.bad, schema=QUARANTINE_SCHEMA)
            self.bad = {k: [] for k in QUARANTINE_SCHEMA.names}


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _metadata(record: dict[str, Any], source: SourceConfig) -> str:
    skip = {source.text_field}
    if source.url_field and isinstance(record.get(source.url_field), str):
        skip.add(source.url_field)
    if source.metadata_fields is not None:
        keep = {k: record[k] for k in source.metadata_fields if k in record and k not in skip}
    else:
        keep = {k: v for k, v in record.items() if k not in skip}
    return json.dumps(keep, ensure_ascii=True, default=str, allow_nan=True)


def _check_record(b: _Batcher, locator: int, record: Any, raw: bytes, source: SourceConfig) -> None:
    if not isinstance(record, dict):
        b.quarantine(locator, NOT_AN_OBJECT, f"expected a JSON object, got {type(record).__name__}", raw)
        return
    if source.text_field not in record or record[source.text_field] is None:
        b.quarantine(locator, MISSING_TEXT, f"no {source.text_field!r} field", raw)
        return
    text = record[source.text_field]
    if not isinstance(text, str):
        b.quarantine(locator, NON_STRING_TEXT, f"{source.text_field!r} is {type(text).__name__}, not a string", raw)
        return
    if not text.strip():
        b.quarantine(locator, EMPTY_TEXT, f"{source.text_field!r} is empty or whitespace", raw)
        return
    if not _valid_unicode(text):
        b.quarantine(locator, INVALID_UNICODE, "text holds lone surrogates (not encodable as UTF-8)", raw)
        return
    url = record.get(source.url_field) if source.url_field else None
    url = url if isinstance(url, str) and _valid_unicode(url) else None
    b.add(locator, text, _metadata(record, source), url)


def _open_decompressed(storage: st.Storage, uri: str):
    f = storage.open(uri, "rb")
    low = uri.lower()
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=f, mode="rb"), f
    if low.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True), f
    return f, f


def read_jsonl(storage: st.Storage, uri: str, relpath: str, source: SourceConfig, batch_rows: int, ctx: Optional[PartContext] = None) -> Iterator[pa.Table]:
    b = _Batcher(source.name, relpath, batch_rows)
    stream, raw_file = _open_decompressed(storage, uri)
    line_no = 0
    try:
        try:
            for line in st.iter_lines(stream):
                line_no += 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                if not line.strip():
                    if ctx is not None:
                        ctx.count("blank_lines")
                    continue
                try:
                    decoded = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    b.quarantine(line_no, INVALID_UTF8, f"byte {e.start}: {e.reason}", line)
                else:
                    try:
                        record = json.loads(decoded)
                    except json.JSONDecodeError as e:
                        b.quarantine(line_no, INVALID_JSON, f"column {e.colno}: {e.msg}", line)
                    else:
                        _check_record(b, line_no, record, line, source)
                if b.full():
                    yield from b.flush()
        except (OSError, EOFError, ValueError) as e:  # truncated/corrupt compressed stream
            b.quarantine(line_no + 1, UNREADABLE_FILE, f"{type(e).__name__}: {e} (after line {line_no})", b"")
    finally:
        stream.close()
        raw_file.close()
    yield from b.flush()


def read_parquet(storage: st.Storage, uri: str, relpath: str, source: SourceConfig, batch_rows: int) -> Iterator[pa.Table]:
    fs, path = storage.arrow_fs(uri)
    pf = pq.ParquetFile(path, filesystem=fs)
    names = pf.schema_arrow.names
    if source.text_field not in names:
        raise KeyError(f"{uri}: no column {source.text_field!r} (columns: {names}); set text_field on source {source.name!r}")
    b = _Batcher(source.name, relpath, batch_rows)
    row = 0
    for rb in pf.iter_batches(batch_size=batch_rows):
        for record in rb.to_pylist():
            raw = json.dumps(record, default=str, ensure_ascii=True).encode()
            _check_record(b, row, record, raw, source)
            row += 1
        if b.full():
            yield from b.flush()
    yield from b.flush()


def read_text_file(storage: st.Storage, uri: str, relpath: str, source: SourceConfig) -> Iterator[pa.Table]:
    b = _Batcher(source.name, relpath, 1)
    data = storage.read_bytes(uri)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        b.quarantine(0, INVALID_UTF8, f"byte {e.start}: {e.reason}", data)
    else:
        if text.startswith("\ufeff"):
            text = text[1:]
        if not text.strip():
            b.quarantine(0, EMPTY_TEXT, "file is empty or whitespace", data)
        else:
            b.add(0, text, json.dumps({"path": relpath}), None, origin_kind="file")
    yield from b.flush()


@register
class Ingest(SourceStage):
    name = "ingest"
    version = "1"
    description = "Read JSONL(.gz/.zst), Parquet and text folders (local or s3://) into id/text/source/metadata rows."
    Config = IngestConfig
    produces = ("id", "text", "source", "metadata", "url", "origin")
    resources = Resources(num_cpus=1)

    def _files(self, storage: st.Storage) -> list[tuple[int, str, str]]:
        out = []
        for si, source in enumerate(self.config.sources):
            for uri, rel in expand_source(storage, source):
                out.append((si, uri, rel))
        return out

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        result = []
        for si, source in enumerate(self.config.sources):
            files = []
            for uri, rel in expand_source(ctx.storage, source):
                files.append({"uri": uri, "relpath": rel, **ctx.storage.file_identity(uri)})
            result.append(ExternalInput(source.name, source.paths[0] if len(source.paths) == 1 else ",".join(source.paths), tuple(files)))
        return result

    def plan(self, ctx: StageContext) -> list[Part]:
        """One part per JSONL/Parquet file; text files grouped (many small files make one part)."""
        parts: list[Part] = []
        group: list[list[str]] = []
        group_bytes = 0
        group_source = -1

        def flush_group() -> None:
            nonlocal group, group_bytes
            if group:
                parts.append(Part(f"{len(parts):05d}", {"uri": group[0][0], "files": group, "source": group_source, "format": "text"}))
                group, group_bytes = [], 0

        for si, uri, rel in self._files(ctx.storage):
            source = self.config.sources[si]
            fmt = source.format if source.format != "auto" else detect_format(uri)
            if fmt != "text" or si != group_source:
                flush_group()
            if fmt == "text":
                group_source = si
                group.append([uri, rel])
                group_bytes += ctx.storage.size(uri)
                if len(group) >= self.config.text_files_per_part or group_bytes >= 64 << 20:
                    flush_group()
            else:
                group_source = -1
                parts.append(Part(f"{len(parts):05d}", {"uri": uri, "relpath": rel, "source": si, "format": fmt}))
        flush_group()
        return parts

    def read_part(self, part: Part, ctx: PartContext) -> Iterator[pa.Table]:
        source = self.config.sources[part.payload["source"]]
        fmt = part.payload["format"]
        if fmt == "text":
            for uri, rel in part.payload["files"]:
                ctx.count("bytes_in", ctx.storage.size(uri))
                ctx.count("files")
                yield from read_text_file(ctx.storage, uri, rel, source)
            return
        uri, rel = part.payload["uri"], part.payload["relpath"]
        ctx.count("bytes_in", ctx.storage.size(uri))
        ctx.count("files")
        if fmt == "jsonl":
            yield from read_jsonl(ctx.storage, uri, rel, source, self.config.batch_rows, ctx)
        else:
            yield from read_parquet(ctx.storage, uri, rel, source, self.config.batch_rows)

    def check(self, manifest: dict[str, Any]) -> None:
        limit = self.config.max_bad_fraction
        counts = manifest["counts"]
        bad = sum(counts["quarantined"].values())
        if limit is not None and counts["rows_in"] and bad / counts["rows_in"] > limit:
            reasons = ", ".join(f"{k}: {v}" for k, v in counts["quarantined"].items())
            raise ValueError(
                f"ingest: {bad} of {counts['rows_in']} records ({bad / counts['rows_in']:.1%}) were quarantined,"
                f" above max_bad_fraction={limit} ({reasons}); see the quarantine dataset of this attempt"
                f" ({manifest['attempt']}) for file, line and detail"
            )
