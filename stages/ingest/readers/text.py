"""Text files: each file one document (origin ``file#0``)."""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa

from pipeline import storage as st
from stages.ingest.config import SourceConfig
from stages.ingest.records import EMPTY_TEXT, INVALID_UTF8, RAW_LIMIT, RECORD_TOO_LARGE, Batcher, too_large_detail


def read_text_file(storage: st.Storage, uri: str, relpath: str, source: SourceConfig) -> Iterator[pa.Table]:
    b = Batcher(source.name, relpath, 1)
    size = storage.size(uri)
    if source.max_record_bytes is not None and size > source.max_record_bytes:
        with storage.open(uri, "rb") as f:
            head = f.read(RAW_LIMIT)
        b.quarantine(0, RECORD_TOO_LARGE, too_large_detail(size, source, len(head)), head)
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
