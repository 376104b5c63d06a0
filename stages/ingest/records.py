"""From a parsed record to an output row or a quarantine record: the schemas, the stable reasons,
the id of a document, field lookup by dotted path, and the checks every reader applies."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Optional

import pyarrow as pa

from pipeline.stage import QUARANTINE_REASON
from stages.ingest.config import SourceConfig

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
BOM = b"\xef\xbb\xbf"
RAW_LIMIT = 1 << 20  # bytes of an unparseable JSON tail kept in the quarantine's raw column


def doc_id(source: str, relpath: str, locator: int) -> str:
    """Stable, corpus-unique id: hash of source name, file path (relative to its source root) and line/row."""
    return hashlib.sha1(f"{source}\x00{relpath}\x00{locator}".encode()).hexdigest()[:20]


class Batcher:
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


MISSING = object()


def get_field(record: dict[str, Any], path: str) -> Any:
    """A record's field by name or dotted path: a top-level key equal to ``path`` wins; otherwise each
    dot goes one level down through nested objects. ``MISSING`` when absent."""
    if path in record:
        return record[path]
    if "." not in path:
        return MISSING
    cur: Any = record
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return MISSING
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
            if value is not MISSING and k not in skip:
                keep[k] = value
    else:
        keep = record
        for path in skip:
            keep = _without(keep, path)
    return json.dumps(keep, ensure_ascii=True, default=str, allow_nan=True)


def check_record(b: Batcher, locator: int, record: Any, raw: bytes, source: SourceConfig,
                  origin_kind: str = "line", where: str = "") -> None:
    """Keep a record or quarantine it with a reason; ``where`` prefixes the detail (e.g. 'element 3 (line 9): ')."""
    if not isinstance(record, dict):
        b.quarantine(locator, NOT_AN_OBJECT, f"{where}expected a JSON object, got {type(record).__name__}", raw)
        return
    text = get_field(record, source.text_field)
    if text is MISSING or text is None:
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


def too_large_detail(size: int, source: SourceConfig, kept: int) -> str:
    return (f"{size} bytes, above max_record_bytes={source.max_record_bytes} of source {source.name!r}"
            f" (the first {kept} bytes are in raw); raise the limit to read it")
