"""``warc_ingest``: WARC and WET files (local or s3://) into one row per crawled page.

Rows (``data``): ``id`` (stable: a hash of the source name and the WARC-Record-ID), ``source``,
``url``, ``crawl_date`` (WARC-Date), ``warc_record_id``, ``warc_type``, ``http_status``,
``content_type`` and ``charset`` (as the server declared them), ``payload`` (the HTTP body, bytes
as crawled: decoding is the extraction stage's job, which can detect a charset) and ``origin``
(``file@offset``: the compressed offset of the record's gzip member, what Common Crawl's index
gives). WET records (``conversion``) are text already; they come through with ``text/plain``.

Every record read is accounted for: records that are not pages go to ``rejected`` with a reason
(``not_a_response``: request, metadata, warcinfo, revisit...; ``http_status_not_ok``;
``not_html``; ``payload_too_large``), without their payload; damaged bytes go to ``quarantine``
with their byte offset (``truncated_member``, ``corrupt_member``, ``unparseable_record``).

A gzip file bigger than ``part_bytes`` is read by several workers, each from a byte range
(``stages/web/warc.py`` syncs each range to its first gzip member).
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
from typing import Any, Iterator, Optional

import pyarrow as pa
from fastwarc.warc import ArchiveIterator, WarcRecordType
from pydantic import Field, field_validator

from pipeline import storage as st
from pipeline.config import PathStr, StrictModel
from pipeline.contracts import Manifest
from pipeline.context import ExternalInput, PartContext, StageContext
from pipeline.registry import register
from pipeline.stage import DROP_REASON, QUARANTINE_REASON, Part, Resources, SourceStage
from stages.web import warc

log = logging.getLogger("lmpipe")

DATA_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("url", pa.string()),
    ("crawl_date", pa.string()),
    ("warc_record_id", pa.string()),
    ("warc_type", pa.string()),
    ("http_status", pa.int32()),
    ("content_type", pa.string()),
    ("charset", pa.string()),
    ("payload", pa.large_binary()),  # pa.binary() builds 90x slower from Python bytes of web-page size
    ("origin", pa.string()),
    (DROP_REASON, pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("file", pa.string()),
    ("offset", pa.int64()),
    (QUARANTINE_REASON, pa.string()),
    ("detail", pa.string()),
    ("raw", pa.large_binary()),
])

# Drop reasons (stable names).
NOT_A_RESPONSE = "not_a_response"
HTTP_STATUS_NOT_OK = "http_status_not_ok"
NOT_HTML = "not_html"
PAYLOAD_TOO_LARGE = "payload_too_large"

PAGE_TYPES = {int(WarcRecordType.response): "response", int(WarcRecordType.conversion): "conversion"}  # the enum is not hashable
HTML_SNIFF = (b"<!doctype html", b"<html")


class WarcSourceConfig(StrictModel):
    name: str = Field(description="source name recorded in every row (e.g. 'cc-2024-10')")
    paths: list[PathStr] = Field(min_length=1, description="WARC/WET files, folders or globs; local or s3://"
                                                            " (.warc, .warc.gz, .warc.zst, .wet, .wet.gz, .wet.zst)")
    allow_empty: bool = Field(default=False, description="accept a source that yields no pages; by default that fails the stage")


class WarcIngestConfig(StrictModel):
    sources: list[WarcSourceConfig] = Field(min_length=1)
    content_types: list[str] = Field(
        default=["text/html", "application/xhtml+xml"],
        description="media types kept from response records (WARC-Identified-Payload-Type when the crawler set it, else"
                    " the HTTP Content-Type; a response with neither is kept when it starts like HTML). WET conversion"
                    " records (text/plain) are always kept")
    statuses: list[int] = Field(default=[200], description="HTTP statuses kept")
    max_payload_bytes: int = Field(default=16 << 20, ge=1, description="larger payloads are rejected (payload_too_large)")
    part_bytes: int = Field(default=256 << 20, ge=1 << 10,
                            description="gzip files larger than this are read by several workers, one byte range each")
    batch_rows: int = Field(default=512, ge=1, description="rows per Arrow batch while reading")

    @field_validator("sources")
    @classmethod
    def _unique(cls, sources: list[WarcSourceConfig]) -> list[WarcSourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source name(s) {', '.join(map(repr, dupes))} appear twice")
        return sources


def page_id(source: str, record_id: str) -> str:
    """Stable id of a page: the same record gets the same id however its file is named or split."""
    return hashlib.sha1(f"{source}\x00{record_id}".encode()).hexdigest()[:20]


def _relpath(uri: str, base: str) -> str:
    base = base.rstrip("/")
    return uri[len(base) + 1:] if base and uri.startswith(base + "/") else posixpath.basename(uri)


def warc_files(storage: st.Storage, source: WarcSourceConfig) -> list[tuple[str, str]]:
    """(file uri, path relative to the folder or glob it was found by) of every WARC/WET file of a source."""
    files: dict[str, str] = {}
    for pattern in source.paths:
        matches = storage.glob(pattern)
        if not matches:
            raise FileNotFoundError(f"source {source.name!r}: {pattern} matches no file")
        for m in matches:
            if storage.isdir(m):
                found = [f for f in storage.find_files(m) if warc.compression_of(f) is not None]
                if not found:
                    raise ValueError(f"source {source.name!r}: folder {m} holds no .warc/.wet files (.gz, .zst or plain)")
                files.update({f: _relpath(f, m) for f in found})
            elif warc.compression_of(m) is None:
                raise ValueError(f"source {source.name!r}: {m} is not named like a WARC or WET file"
                                 f" (.warc, .warc.gz, .warc.zst, .wet, .wet.gz, .wet.zst)")
            else:
                files[m] = posixpath.basename(m) if "*" not in pattern else _relpath(m, pattern.split("*")[0].rsplit("/", 1)[0])
    return sorted(files.items())


class _Rows:
    """Collects page rows and quarantined stretches; emits bounded Arrow tables."""

    def __init__(self, source: str, relpath: str, batch_rows: int):
        self.source, self.relpath, self.batch_rows = source, relpath, batch_rows
        self.rows: dict[str, list] = {k: [] for k in DATA_SCHEMA.names}
        self.bad: dict[str, list] = {k: [] for k in QUARANTINE_SCHEMA.names}

    def add(self, offset: int, values: dict[str, Any]) -> None:
        for k in DATA_SCHEMA.names:
            self.rows[k].append(values.get(k))
        self.rows["source"][-1] = self.source
        self.rows["origin"][-1] = f"{self.relpath}@{offset}"

    def quarantine(self, damage: warc.Damage) -> None:
        b = self.bad
        b["id"].append(hashlib.sha1(f"{self.source}\x00{self.relpath}\x00{damage.offset}".encode()).hexdigest()[:20])
        b["source"].append(self.source)
        b["file"].append(self.relpath)
        b["offset"].append(damage.offset)
        b[QUARANTINE_REASON].append(damage.reason)
        b["detail"].append(damage.detail[:1000])
        b["raw"].append(damage.raw)

    def full(self) -> bool:
        return len(self.rows["id"]) >= self.batch_rows or len(self.bad["id"]) >= self.batch_rows

    def flush(self) -> Iterator[pa.Table]:
        if self.rows["id"]:
            yield pa.table(self.rows, schema=DATA_SCHEMA)
            self.rows = {k: [] for k in DATA_SCHEMA.names}
        if self.bad["id"]:
            yield pa.table(self.bad, schema=QUARANTINE_SCHEMA)
            self.bad = {k: [] for k in QUARANTINE_SCHEMA.names}


def _media_type(value: Optional[str]) -> Optional[str]:
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


class PageRules:
    """What a parsed record becomes: a page row, or a rejected row with a reason."""

    def __init__(self, config: WarcIngestConfig):
        self.content_types = {t.lower() for t in config.content_types}
        self.statuses = set(config.statuses)
        self.max_payload = config.max_payload_bytes

    def row(self, source: str, record_bytes: bytes) -> dict[str, Any]:
        """The row of one framed record; raises ValueError when fastwarc cannot parse it."""
        try:
            record = next(iter(ArchiveIterator(io.BytesIO(record_bytes), parse_http=True, auto_decode="all")))
        except (StopIteration, OSError) as e:
            raise ValueError(f"fastwarc cannot parse the record: {e or 'no record'}") from None
        headers = record.headers
        record_id = headers.get("WARC-Record-ID")
        if not record_id:
            raise ValueError("the record has no WARC-Record-ID")
        kind = PAGE_TYPES.get(int(record.record_type))
        row: dict[str, Any] = {
            "id": page_id(source, record_id),
            "url": headers.get("WARC-Target-URI"),
            "crawl_date": headers.get("WARC-Date"),
            "warc_record_id": record_id,
            "warc_type": kind or (headers.get("WARC-Type") or "").lower(),
        }
        if kind is None:
            row[DROP_REASON] = NOT_A_RESPONSE
            return row
        if kind == "conversion":  # a WET record: the text a crawler extracted
            row["content_type"] = _media_type(headers.get("Content-Type")) or "text/plain"
            row["charset"] = "utf-8"
        else:
            http = record.http_headers
            status = http.status_code if http is not None else None
            row["http_status"] = status
            row["content_type"] = _media_type(headers.get("WARC-Identified-Payload-Type")) or _media_type(record.http_content_type)
            row["charset"] = (record.http_charset or "").lower() or None
            if status not in self.statuses:
                row[DROP_REASON] = HTTP_STATUS_NOT_OK
                return row
        if kind == "response" and row["content_type"] is not None and row["content_type"] not in self.content_types:
            row[DROP_REASON] = NOT_HTML
            return row
        payload = record.reader.read(self.max_payload + 1)
        if len(payload) > self.max_payload:
            row[DROP_REASON] = PAYLOAD_TOO_LARGE
            return row
        if kind == "response" and row["content_type"] is None:
            if not payload.lstrip()[:512].lower().startswith(HTML_SNIFF):
                row[DROP_REASON] = NOT_HTML
                return row
            row["content_type"] = "text/html"
        row["payload"] = payload
        return row


def read_warc(stream: Any, kind: warc.Compression, source: str, relpath: str, rules: PageRules, batch_rows: int,
              start: int = 0, end: Optional[int] = None) -> Iterator[pa.Table]:
    """The rows of every record starting in [start, end) of one WARC/WET file, in file order."""
    out = _Rows(source, relpath, batch_rows)
    for item in warc.iter_records(stream, kind, start, end):
        if isinstance(item, warc.Damage):
            out.quarantine(item)
        else:
            try:
                out.add(item.offset, rules.row(source, item.data))
            except ValueError as e:
                out.quarantine(warc.Damage(item.offset, warc.UNPARSEABLE_RECORD, f"byte {item.offset}: {e}",
                                           item.data[:warc.RAW_LIMIT]))
        if out.full():
            yield from out.flush()
    yield from out.flush()


def _counter(source: str, what: str) -> str:
    return f"source:{source}:{what}"


@register
class WarcIngest(SourceStage):
    name = "warc_ingest"
    version = "1"
    description = "Read WARC/WET files (.warc[.gz|.zst], .wet[.gz|.zst]; local or s3://) into one row per crawled page, byte ranges of big files in parallel."
    Config = WarcIngestConfig
    produces = tuple(n for n in DATA_SCHEMA.names if n != DROP_REASON)
    outputs = ("data", "rejected", "quarantine")
    measure_column = None
    resources = Resources(num_cpus=1)
    libraries = ("pyarrow", "fastwarc", "zstandard")

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        out = []
        for source in self.config.sources:
            files = tuple({"uri": uri, "relpath": rel, **ctx.storage.file_identity(uri)} for uri, rel in warc_files(ctx.storage, source))
            out.append(ExternalInput(source.name, ",".join(source.paths), files))
        return out

    def plan(self, ctx: StageContext) -> list[Part]:
        """One part per file; a gzip file bigger than ``part_bytes`` gets one part per byte range."""
        parts: list[Part] = []
        step = self.config.part_bytes
        for si, source in enumerate(self.config.sources):
            for uri, rel in warc_files(ctx.storage, source):
                kind = warc.compression_of(uri)
                size = ctx.storage.size(uri)
                starts = range(0, size, step) if kind == "gzip" and size > step else [0]
                for start in starts:
                    end = start + step if kind == "gzip" and start + step < size else None
                    parts.append(Part(f"{len(parts):05d}", {"uri": uri, "relpath": rel, "source": si, "start": start, "end": end}))
        return parts

    def read_part(self, part: Part, ctx: PartContext) -> Iterator[pa.Table]:
        p = part.payload
        source = self.config.sources[p["source"]].name
        size = ctx.storage.size(p["uri"])
        ctx.count("bytes_in", (size if p["end"] is None else p["end"]) - p["start"])
        if p["start"] == 0:
            ctx.count("files")
            ctx.count(_counter(source, "files"))
        rules = PageRules(self.config)
        with ctx.storage.open(p["uri"], "rb") as stream:
            for table in read_warc(stream, warc.compression_of(p["uri"]), source, p["relpath"], rules, self.config.batch_rows,
                                   p["start"], p["end"]):
                if DROP_REASON in table.column_names:
                    ctx.count(_counter(source, "kept"), table.column(DROP_REASON).null_count)
                yield table

    def check(self, manifest: Manifest) -> None:
        counters = manifest.counters
        for source in self.config.sources:
            if source.allow_empty or int(counters.get(_counter(source.name, "kept"), 0)):
                continue
            c = manifest.counts
            raise ValueError(
                f"warc_ingest: source {source.name!r} yielded no pages (stage totals: {c.rows_in} records,"
                f" rejected {c.rejected or 'none'}, quarantined {c.quarantined or 'none'}); check its paths"
                f" ({', '.join(source.paths)}) and content_types/statuses, see the rejected and quarantine datasets of"
                f" attempt {manifest.attempt}, or set allow_empty: true on the source")
