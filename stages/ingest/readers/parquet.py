"""Parquet files, batch by batch; nested struct fields reached by dotted paths."""

from __future__ import annotations

import json
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage as st
from stages.ingest.config import SourceConfig
from stages.ingest.listing import short_list
from stages.ingest.decompress import unreadable_detail
from stages.ingest.planning import RowGroupSpan
from stages.ingest.records import UNREADABLE_FILE, Batcher, check_record


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


# What a damaged Parquet file raises: a bad footer or magic bytes (ArrowInvalid, a ValueError), a
# bad page or a short read (OSError), a thrift or decoding error (ArrowException).
PARQUET_ERRORS = (OSError, ValueError, EOFError, pa.ArrowException)


def read_parquet(storage: st.Storage, uri: str, relpath: str, source: SourceConfig, batch_rows: int,
                 span: Optional[RowGroupSpan] = None) -> Iterator[pa.Table]:
    """A Parquet file, batch by batch (locator: the 0-based row in the file); with ``span``, only its
    row groups. A file that is not readable
    Parquet (a bad footer, a damaged page) keeps the rows read before the damage and adds one
    ``unreadable_file`` record with the reason, as a damaged .gz/.zst does; a text field the file
    does not have is a config error and fails the stage."""
    b = Batcher(source.name, relpath, batch_rows)
    try:
        fs, path = storage.arrow_fs(uri)
        pf = pq.ParquetFile(path, filesystem=fs)
        schema = pf.schema_arrow
    except PARQUET_ERRORS as e:
        b.quarantine(0, UNREADABLE_FILE, f"{type(e).__name__}: {e} (not a readable Parquet file; nothing was read) --"
                                          f" re-fetch or repair the file to read it", b"")
        yield from b.flush()
        return
    if not _parquet_has(schema, source.text_field):
        paths = _parquet_paths(schema)
        raise KeyError(f"{uri}: no column {source.text_field!r} (columns: {short_list(paths, 50)}); set text_field on source"
                       f" {source.name!r} (a dotted path reaches into struct columns)")
    row = 0 if span is None else span.first_row
    groups = None if span is None else list(range(span.first, span.stop))
    batches = pf.iter_batches(batch_size=batch_rows, row_groups=groups)
    while True:
        try:
            rb = next(batches, None)
        except PARQUET_ERRORS as e:
            b.quarantine(row, UNREADABLE_FILE, unreadable_detail(e, f"{row} rows", f"row {row} of {pf.metadata.num_rows}"), b"")
            break
        if rb is None:
            break
        for record in rb.to_pylist():
            raw = json.dumps(record, default=str, ensure_ascii=True).encode()
            check_record(b, row, record, raw, source)
            row += 1
        if b.full():
            yield from b.flush()
    yield from b.flush()
