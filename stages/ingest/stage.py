"""Ingest: JSONL (plain, .gz, .zst), JSON arrays, Parquet and folders of them or of text files; local or s3://.

Output rows: ``id`` (stable: source + file + line/row/element), ``text``, ``source``, ``metadata``
(JSON of the remaining fields), ``url`` and ``origin`` (``file:line`` for JSONL lines and Parquet
rows, ``file#n`` for text files (n = 0) and JSON array elements (n = element index); lineage).
Malformed records go to the ``quarantine`` dataset with ``file``/``line``, a reason and the raw bytes;
a file that cannot be read to its end (truncated or corrupt .gz/.zst) keeps what was read and adds
one ``unreadable_file`` record saying where it stopped.

Nothing is dropped silently: a folder is read by the formats of the files it holds (and refused at
plan time when it holds none), and a source that yields no documents -- no records at all, or every
record quarantined -- fails the stage unless the source sets ``allow_empty: true``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import zlib
from typing import Any, Iterator, Literal, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from pydantic import Field, field_validator

from pipeline import storage as st
from pipeline.config import PathStr, StrictModel
from pipeline.context import ExternalInput, PartContext, StageContext
from pipeline.registry import register
from pipeline.stage import QUARANTINE_REASON, Part, Resources, SourceStage

log = logging.getLogger("lmpipe")

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
RECORD_TOO_LARGE = "record_too_large"  # a JSONL line or text file above the source's max_record_bytes

_COMPRESSIONS = ("", ".gz", ".zst")
JSONL_SUFFIXES = tuple(s + c for s in (".jsonl", ".ndjson") for c in _COMPRESSIONS)
JSON_SUFFIXES = tuple(".json" + c for c in _COMPRESSIONS)
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".txt", ".md", ".text")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
BOM = b"\xef\xbb\xbf"
# What reading a damaged file raises: gzip (EOFError when truncated, BadGzipFile -- an OSError -- on a
# bad header or CRC, zlib.error on bad deflate data), zstd (ZstdError; EOFError from _ZstdStream when
# truncated), the storage (OSError).
DECOMPRESS_ERRORS = (OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError)
RAW_LIMIT = 1 << 20  # bytes of an unparseable JSON tail kept in the quarantine's raw column
_FIELD_NOTE = (" A dotted path (doc.text) reaches into nested objects (Parquet: struct columns); a top-level key"
               " that itself contains the dot wins over the nested path.")


class SourceConfig(StrictModel):
    name: str = Field(description="source name recorded in every row (e.g. 'news')")
    paths: list[PathStr] = Field(min_length=1, description="files, folders or globs; local or s3://")
    format: Literal["auto", "jsonl", "json", "parquet", "text"] = Field(
        default="auto",
        description="auto: each file by its name (.jsonl/.ndjson, .json, each optionally .gz/.zst; .parquet/.pq;"
                    " .txt/.md/.text, in folders the files matching text_glob); or one format for every file")
    text_field: str = Field(default="text", description="field holding the document text." + _FIELD_NOTE)
    url_field: Optional[str] = Field(default="url", description="field holding the URL (null: none); dotted paths as for text_field")
    metadata_fields: Optional[list[str]] = Field(
        default=None, description="fields kept in metadata (default: all others); dotted paths as for text_field, kept under that name")
    text_glob: str = Field(default="**/*.txt", description="with format auto, the files of a folder read as text (the others"
                                                           " are read by their names; files of no known format are skipped)")
    max_record_bytes: Optional[int] = Field(
        default=64 << 20, ge=1,
        description="largest JSONL line or text file read as one record (bytes); a bigger one is quarantined as"
                    " record_too_large without being held in memory (null: no limit)")
    allow_empty: bool = Field(default=False, description="accept a source that yields no documents (no records, or every"
                                                         " record quarantined); by default that fails the stage")

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


def format_of(name: str) -> Optional[str]:
    """The format a file's name says (jsonl, json, parquet, text), None when it says none."""
    low = name.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(JSON_SUFFIXES):
        return "json"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def detect_format(uri: str) -> str:
    fmt = format_of(uri)
    if fmt is None:
        raise ValueError(f"{uri}: cannot tell the format from the name; set format: jsonl|json|parquet|text on the source")
    return fmt


def _folder_format(rel: str, source: SourceConfig) -> Optional[str]:
    """With format auto, how a file found in a folder is read: data formats by name, text by text_glob."""
    fmt = format_of(rel)
    if fmt in ("jsonl", "json", "parquet"):
        return fmt
    return "text" if _matches_text_glob(rel, source.text_glob) else None


def _listing(names: list[str], limit: int = 10) -> str:
    if not names:
        return "nothing"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def source_files(storage: st.Storage, source: SourceConfig) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(file uri, path relative to its source root, format) for every file of a source, sorted; and
    the files of its folders that are skipped (format auto: no known format by name or text_glob)."""
    files: list[tuple[str, str, str]] = []
    skipped: list[str] = []
    for pattern in source.paths:
        matches = storage.glob(pattern)
        if not matches:
            raise FileNotFoundError(f"source {source.name!r}: {pattern} matches no file")
        for m in matches:
            if storage.isdir(m):
                found = [(f, _relpath(f, m)) for f in storage.find_files(m)]
                if source.format == "auto":
                    readable = [(f, rel, _folder_format(rel, source)) for f, rel in found]
                    skipped.extend(f for f, _, fmt in readable if fmt is None)
                    readable = [r for r in readable if r[2] is not None]
                else:
                    readable = [(f, rel, source.format) for f, rel in found]
                if not readable:
                    raise ValueError(
                        f"source {source.name!r}: folder {m} holds no readable files (found: {_listing([rel for _, rel in found])});"
                        f" name them .jsonl/.ndjson/.json (optionally .gz/.zst) or .parquet, match text_glob"
                        f" ({source.text_glob!r}) for text, or set format: on the source"
                    )
                files.extend(readable)
            else:
                try:
                    fmt = source.format if source.format != "auto" else detect_format(m)
                except ValueError as e:
                    raise ValueError(f"source {source.name!r}: {e}") from None
                files.append((m, _relpath(m, _glob_base(pattern)), fmt))
    seen: set[str] = set()
    unique = []
    for f, rel, fmt in files:
        if f not in seen:
            seen.add(f)
            unique.append((f, rel, fmt))
    return sorted(unique), skipped


def expand_source(storage: st.Storage, source: SourceConfig) -> list[tuple[str, str, str]]:
    """(file uri, path relative to its source root, format) for every file of a source, sorted."""
    return source_files(storage, source)[0]


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


_MISSING = object()


def get_field(record: dict[str, Any], path: str) -> Any:
    """A record's field by name or dotted path: a top-level key equal to ``path`` wins; otherwise each
    dot goes one level down through nested objects. ``_MISSING`` when absent."""
    if path in record:
        return record[path]
    if "." not in path:
        return _MISSING
    cur: Any = record
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return _MISSING
        cur = cur[key]
    return cur


def _without(record: dict[str, Any], path: str) -> dict[str, Any]:
    """A copy of ``record`` without the field ``get_field(record, path)`` finds (nested objects
    emptied by the removal go too); ``record`` itself when there is no such field."""
    if path in record:
        return {k: v for k, v in record.items() if k != path}
    if "." not in path:
        return record

    def remove(obj: Any, keys: list[str]) -> Any:
        if not isinstance(obj, dict) or keys[0] not in obj:
            return obj
        if len(keys) == 1:
            return {k: v for k, v in obj.items() if k != keys[0]}
        child = remove(obj[keys[0]], keys[1:])
        if child is obj[keys[0]]:
            return obj
        return {k: (child if k == keys[0] else v) for k, v in obj.items() if k != keys[0] or child}

    return remove(record, path.split("."))


def _metadata(record: dict[str, Any], source: SourceConfig) -> str:
    skip = [source.text_field]
    if source.url_field and isinstance(get_field(record, source.url_field), str):
        skip.append(source.url_field)
    if source.metadata_fields is not None:
        keep = {}
        for k in source.metadata_fields:
            value = get_field(record, k)
            if value is not _MISSING and k not in skip:
                keep[k] = value
    else:
        keep = record
        for path in skip:
            keep = _without(keep, path)
    return json.dumps(keep, ensure_ascii=True, default=str, allow_nan=True)


def _check_record(b: _Batcher, locator: int, record: Any, raw: bytes, source: SourceConfig,
                  origin_kind: str = "line", where: str = "") -> None:
    """Keep a record or quarantine it with a reason; ``where`` prefixes the detail (e.g. 'element 3 (line 9): ')."""
    if not isinstance(record, dict):
        b.quarantine(locator, NOT_AN_OBJECT, f"{where}expected a JSON object, got {type(record).__name__}", raw)
        return
    text = get_field(record, source.text_field)
    if text is _MISSING or text is None:
        b.quarantine(locator, MISSING_TEXT, f"{where}no {source.text_field!r} field", raw)
        return
    if not isinstance(text, str):
        b.quarantine(locator, NON_STRING_TEXT, f"{where}{source.text_field!r} is {type(text).__name__}, not a string", raw)
        return
    if not text.strip():
        b.quarantine(locator, EMPTY_TEXT, f"{where}{source.text_field!r} is empty or whitespace", raw)
        return
    if not _valid_unicode(text):
        b.quarantine(locator, INVALID_UNICODE, f"{where}text holds lone surrogates (not encodable as UTF-8)", raw)
        return
    url = get_field(record, source.url_field) if source.url_field else None
    url = url if isinstance(url, str) and _valid_unicode(url) else None
    b.add(locator, text, _metadata(record, source), url, origin_kind)


class _ZstdStream:
    """A .zst file decompressed frame after frame. Unlike zstandard's ``stream_reader``, which ends
    quietly, a file that stops inside a frame raises EOFError (as gzip does). An error is raised
    only once everything decoded before it has been returned, so no complete line is lost. Memory:
    one 64 KiB compressed chunk and what it decompresses to."""

    def __init__(self, raw: Any, read_size: int = 1 << 16):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None
        self._buf = bytearray()
        self._error: Optional[BaseException] = None
        self._eof = False
        self._read_size = read_size

    def read(self, size: int = -1) -> bytes:
        while not self._eof and self._error is None and (size < 0 or len(self._buf) < size):
            chunk = self._raw.read(self._read_size)
            if not chunk:
                self._eof = True
                if self._frame is not None:
                    self._error = EOFError("the file ends inside a zstd frame: it is truncated")
                break
            try:
                self._feed(chunk)
            except zstandard.ZstdError as e:
                self._error = e
        if not self._buf and self._error is not None:
            raise self._error
        n = len(self._buf) if size < 0 else min(size, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _feed(self, data: bytes) -> None:
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            self._buf += self._frame.decompress(data)
            if self._frame.eof:
                data = self._frame.unused_data
                self._frame = None
            else:
                data = b""

    def close(self) -> None:
        pass


class _Counting:
    """Counts the bytes read through a stream (to say where a damaged file stopped)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.n += len(data)
        return data


class _Prefixed:
    """A stream that first returns ``prefix`` (bytes already read), then the rest of ``stream``."""

    def __init__(self, prefix: bytes, stream: Any):
        self.prefix = prefix
        self.offset = 0  # not re-slicing the prefix per read: that is quadratic in a long first line
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        if self.offset < len(self.prefix):
            end = len(self.prefix) if size < 0 else self.offset + size
            out = self.prefix[self.offset:end]
            self.offset += len(out)
            if self.offset >= len(self.prefix):
                self.prefix, self.offset = b"", 0
            return out
        return self.stream.read(size)


def _open_decompressed(storage: st.Storage, uri: str):
    f = storage.open(uri, "rb")
    low = uri.lower()
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=f, mode="rb"), f
    if low.endswith(".zst"):
        return _ZstdStream(f), f
    return f, f


def _position(counted: _Counting, raw_file: Any) -> str:
    """Where reading stopped, for an ``unreadable_file`` detail (call before closing the file)."""
    try:
        where = f" from the first {raw_file.tell()} bytes of the file"
    except Exception:  # a stream that cannot tell its position
        where = ""
    return f"{counted.n} bytes decompressed{where}"


def _unreadable_detail(e: BaseException, after: str, position: str) -> str:
    return (f"{type(e).__name__}: {e} (after {after}; {position}); what was read before is kept --"
            f" re-fetch or repair the file to read the rest")


class _LineState:
    line = 0


def _jsonl_records(stream: Any, b: _Batcher, source: SourceConfig, state: _LineState, ctx: Optional[PartContext]) -> Iterator[pa.Table]:
    for line in st.iter_lines(stream, max_line_bytes=source.max_record_bytes, head_bytes=RAW_LIMIT):
        state.line += 1
        line_no = state.line
        if isinstance(line, st.OversizedLine):
            b.quarantine(line_no, RECORD_TOO_LARGE, _too_large_detail(line.size, source, len(line.head)), line.head)
            if b.full():
                yield from b.flush()
            continue
        if line_no == 1 and line.startswith(BOM):  # a UTF-8 byte order mark is not part of the first record
            line = line[len(BOM):]
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


def _too_large_detail(size: int, source: SourceConfig, kept: int) -> str:
    return (f"{size} bytes, above max_record_bytes={source.max_record_bytes} of source {source.name!r}"
            f" (the first {kept} bytes are in raw); raise the limit to read it")


def _jsonl_checked(stream: Any, counted: _Counting, raw_file: Any, b: _Batcher, source: SourceConfig,
                   ctx: Optional[PartContext]) -> Iterator[pa.Table]:
    """JSON Lines from ``stream``; a stream that breaks (truncated/corrupt .gz/.zst) keeps the lines
    read so far and adds one ``unreadable_file`` record after them."""
    state = _LineState()
    try:
        yield from _jsonl_records(stream, b, source, state, ctx)
    except DECOMPRESS_ERRORS as e:
        b.quarantine(state.line + 1, UNREADABLE_FILE, _unreadable_detail(e, f"line {state.line}", _position(counted, raw_file)), b"")


def read_jsonl(storage: st.Storage, uri: str, relpath: str, source: SourceConfig, batch_rows: int, ctx: Optional[PartContext] = None) -> Iterator[pa.Table]:
    """JSON Lines, streamed (memory: one line and one batch). Locator: the 1-based line number."""
    b = _Batcher(source.name, relpath, batch_rows)
    stream, raw_file = _open_decompressed(storage, uri)
    counted = _Counting(stream)
    try:
        yield from _jsonl_checked(counted, counted, raw_file, b, source, ctx)
    finally:
        stream.close()
        raw_file.close()
    yield from b.flush()


_WS = re.compile(r"[ \t\n\r]*")
_WS_BYTES = re.compile(rb"[ \t\n\r]*")


def _read_rest(stream: Any) -> tuple[bytes, Optional[BaseException]]:
    chunks = []
    try:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except DECOMPRESS_ERRORS as e:
        return b"".join(chunks), e
    return b"".join(chunks), None


def _read_head(stream: Any) -> tuple[bytes, bool, Optional[BaseException]]:
    """The start of a file up to the end of its first non-blank line: (bytes, at end of file, error)."""
    head = bytearray()  # grown in place and searched only where it grew: linear in a long first line
    blank_to = 0  # the leading BOM and whitespace end here (so far)
    while True:
        try:
            chunk = stream.read(1 << 16)
        except DECOMPRESS_ERRORS as e:
            return bytes(head), True, e
        if not chunk:
            return bytes(head), True, None
        searched_to = len(head)
        head += chunk
        if blank_to == 0 and head.startswith(BOM):
            blank_to = len(BOM)
        blank_to = _WS_BYTES.match(head, blank_to).end()
        if blank_to < len(head) and head.find(b"\n", max(blank_to, searched_to)) >= 0:
            return bytes(head), False, None


def _first_line_is_a_value(body: bytes) -> bool:
    start = _WS_BYTES.match(body).end()
    end = body.find(b"\n", start)
    line = body[start:] if end < 0 else body[start:end]
    try:
        json.loads(line.decode("utf-8", "surrogateescape"))
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def read_json(storage: st.Storage, uri: str, relpath: str, source: SourceConfig, batch_rows: int, ctx: Optional[PartContext] = None) -> Iterator[pa.Table]:
    """A ``.json`` file (optionally .gz/.zst), decided by its content:

    * it starts with ``[``: one JSON array, each element a record (locator: the 0-based element
      index, origin ``file#index``). Broken JSON keeps the elements before the damage and
      quarantines the rest of the file as one ``invalid_json`` record naming the line and column;
    * it holds exactly one object spread over several lines: one record (locator: its first line);
    * otherwise it is JSON Lines (as many ``.json`` files are) and is read exactly like ``.jsonl``,
      streamed, with the same ids.

    Memory: JSON Lines stream (one line at a time). An array or a multi-line object is read whole:
    the decompressed bytes, then their decoded text (1-4 bytes per character) -- about 2-5x the
    decompressed size at the peak -- plus one parsed element at a time; rows still leave in batches
    of ``batch_rows``. Fine for files of up to a few hundred MB; write bigger data as JSONL.
    """
    b = _Batcher(source.name, relpath, batch_rows)
    stream, raw_file = _open_decompressed(storage, uri)
    counted = _Counting(stream)
    try:
        head, at_end, error = _read_head(counted)
        body = head[len(BOM):] if head.startswith(BOM) else head
        start = _WS_BYTES.match(body).end()
        is_array = body[start:start + 1] == b"["
        if not is_array and error is None and (at_end or _first_line_is_a_value(body)):
            # JSON Lines (or a one-line file): streamed, exactly like .jsonl
            yield from _jsonl_checked(_Prefixed(head, counted), counted, raw_file, b, source, ctx)
            yield from b.flush()
            return
        if error is None and not at_end:
            rest, error = _read_rest(counted)
            head += rest
            del rest
        position = _position(counted, raw_file)
    finally:
        stream.close()
        raw_file.close()
    data = head[len(BOM):] if head.startswith(BOM) else head
    del head
    text = data.decode("utf-8", "surrogateescape")  # bytes that are not UTF-8 stay recoverable (raw)
    if is_array:
        del data
        cut = None if error is None else _unreadable_detail(error, "the elements before", position)
        yield from _json_array(b, text, _WS.match(text).end(), source, cut)
        return
    decoder = json.JSONDecoder()
    start = _WS.match(text).end()
    try:
        value, end = decoder.raw_decode(text, start)
    except (json.JSONDecodeError, RecursionError):
        value, end = _MISSING, start
    if value is not _MISSING and _WS.match(text, end).end() == len(text) and error is None:
        del data
        line = 1 + text.count("\n", 0, start)
        raw = text[start:end].encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            b.quarantine(line, INVALID_UTF8, f"byte {e.start}: {e.reason}", raw)
        else:
            _check_record(b, line, value, raw, source)
        yield from b.flush()
        return
    # JSON Lines after all (e.g. a broken first line), already in memory
    del text
    if error is not None:  # a damaged stream: its last, partial line is not a record (as in read_jsonl)
        data = data[: data.rfind(b"\n") + 1]
    state = _LineState()
    yield from _jsonl_records(io.BytesIO(data), b, source, state, ctx)
    if error is not None:
        b.quarantine(state.line + 1, UNREADABLE_FILE, _unreadable_detail(error, f"line {state.line}", position), b"")
    yield from b.flush()


def _json_array(b: _Batcher, text: str, pos: int, source: SourceConfig, cut: Optional[str]) -> Iterator[pa.Table]:
    """The elements of the JSON array starting at ``text[pos] == '['``, parsed one at a time."""
    decoder = json.JSONDecoder()
    n = len(text)
    index = 0
    counted_to, line = 0, 1

    def line_at(p: int) -> int:
        nonlocal counted_to, line
        line += text.count("\n", counted_to, p)
        counted_to = p
        return line

    def stop(p: int, message: str) -> None:
        """Everything from ``p`` on cannot be parsed: one record for the rest of the file."""
        rest = text[p:].encode("utf-8", "surrogateescape")
        kept = "" if len(rest) <= RAW_LIMIT else f", the first {RAW_LIMIT} in raw"
        where = f"element {index} (line {line_at(p)}): {message}; the rest of the file ({len(rest)} bytes{kept}) is not read"
        if cut is not None:
            b.quarantine(index, UNREADABLE_FILE, f"{where}; {cut}", rest[:RAW_LIMIT])
        else:
            b.quarantine(index, INVALID_JSON, f"{where} -- fix the JSON to read it", rest[:RAW_LIMIT])

    pos = _WS.match(text, pos + 1).end()
    closed = pos < n and text[pos] == "]"
    if closed:
        pos += 1
    while not closed:
        if pos >= n:
            stop(pos, "the file ends inside the array")
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            stop(pos, f"{e.msg} at line {e.lineno} column {e.colno}")
            break
        except RecursionError:
            stop(pos, "nested too deeply to parse")
            break
        raw = text[pos:end].encode("utf-8", "surrogateescape")
        where = f"element {index} (line {line_at(pos)}): "
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            b.quarantine(index, INVALID_UTF8, f"{where}byte {e.start}: {e.reason}", raw)
        else:
            _check_record(b, index, value, raw, source, origin_kind="file", where=where)
        if b.full():
            yield from b.flush()
        index += 1
        pos = _WS.match(text, end).end()
        if pos < n and text[pos] == ",":
            pos = _WS.match(text, pos + 1).end()
        elif pos < n and text[pos] == "]":
            closed, pos = True, pos + 1
        elif pos < n:
            stop(pos, f"expected ',' or ']' after element {index - 1}")
            break
    if closed:
        pos = _WS.match(text, pos).end()
        if pos < n:
            stop(pos, "extra data after the array's closing ']'")
        elif cut is not None:
            b.quarantine(index, UNREADABLE_FILE, cut, b"")
    yield from b.flush()


def _parquet_paths(schema: pa.Schema) -> list[str]:
    """Every column and nested struct field of a Parquet schema as a dotted path."""
    out: list[str] = []

    def walk(prefix: str, field: pa.Field) -> None:
        path = f"{prefix}{field.name}"
        out.append(path)
        if pa.types.is_struct(field.type):
            for i in range(field.type.num_fields):
                walk(path + ".", field.type.field(i))

    for f in schema:
        walk("", f)
    return out


def _parquet_has(schema: pa.Schema, path: str) -> bool:
    if path in schema.names:
        return True
    keys = path.split(".")
    if keys[0] not in schema.names:
        return False
    typ = schema.field(keys[0]).type
    for key in keys[1:]:
        if not pa.types.is_struct(typ) or typ.get_field_index(key) < 0:
            return False
        typ = typ.field(typ.get_field_index(key)).type
    return True


def read_parquet(storage: st.Storage, uri: str, relpath: str, source: SourceConfig, batch_rows: int) -> Iterator[pa.Table]:
    fs, path = storage.arrow_fs(uri)
    pf = pq.ParquetFile(path, filesystem=fs)
    schema = pf.schema_arrow
    if not _parquet_has(schema, source.text_field):
        paths = _parquet_paths(schema)
        raise KeyError(f"{uri}: no column {source.text_field!r} (columns: {_listing(paths, 50)}); set text_field on source"
                       f" {source.name!r} (a dotted path reaches into struct columns)")
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
    size = storage.size(uri)
    if source.max_record_bytes is not None and size > source.max_record_bytes:
        with storage.open(uri, "rb") as f:
            head = f.read(RAW_LIMIT)
        b.quarantine(0, RECORD_TOO_LARGE, _too_large_detail(size, source, len(head)), head)
        yield from b.flush()
        return
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
            if skipped:
                log.warning("[ingest] source %r: %d file(s) of no known format skipped: %s (set text_glob or format:"
                            " to read them)", source.name, len(skipped), _listing(skipped, 5))
            for uri, rel, fmt in files:
                out.append((si, uri, rel, fmt))
        return out

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        result = []
        for source in self.config.sources:
            files = []
            for uri, rel, _fmt in expand_source(ctx.storage, source):
                files.append({"uri": uri, "relpath": rel, **ctx.storage.file_identity(uri)})
            result.append(ExternalInput(source.name, source.paths[0] if len(source.paths) == 1 else ",".join(source.paths), tuple(files)))
        return result

    def plan(self, ctx: StageContext) -> list[Part]:
        """One part per JSONL/JSON/Parquet file; text files grouped (many small files make one part)."""
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
        yield from _counted(self._read_part(part, ctx, source), ctx, source.name)

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
        ctx.count("bytes_in", ctx.storage.size(uri))
        ctx.count("files")
        ctx.count(_source_counter(source.name, "files"))
        if fmt == "jsonl":
            yield from read_jsonl(ctx.storage, uri, rel, source, self.config.batch_rows, ctx)
        elif fmt == "json":
            yield from read_json(ctx.storage, uri, rel, source, self.config.batch_rows, ctx)
        else:
            yield from read_parquet(ctx.storage, uri, rel, source, self.config.batch_rows)

    def check(self, manifest: dict[str, Any]) -> None:
        counts = manifest["counts"]
        counters = manifest.get("counters", {})
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
                    f" of this attempt ({manifest['attempt']}) for file, line and detail, or set allow_empty: true on the"
                    f" source to accept it"
                )
            raise ValueError(
                f"ingest: source {source.name!r} yielded no documents: its {files} file(s) hold no records (empty or blank);"
                f" check its paths ({', '.join(source.paths)}), or set allow_empty: true on the source if that is expected"
            )
        limit = self.config.max_bad_fraction
        bad = sum(counts["quarantined"].values())
        if limit is not None and counts["rows_in"] and bad / counts["rows_in"] > limit:
            reasons_text = ", ".join(f"{k}: {v}" for k, v in counts["quarantined"].items())
            raise ValueError(
                f"ingest: {bad} of {counts['rows_in']} records ({bad / counts['rows_in']:.1%}) were quarantined,"
                f" above max_bad_fraction={limit} ({reasons_text}); see the quarantine dataset of this attempt"
                f" ({manifest['attempt']}) for file, line and detail"
            )
