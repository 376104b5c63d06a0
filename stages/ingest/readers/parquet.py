"""Parquet files, batch by batch; nested struct fields reached by dotted paths."""

from __future__ import annotations

import json
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage as st
from stages.ingest.config import SourceConfig
from stages.ingest.listing import short_list
from stages.ingest.records import Batcher, check_record


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
        raise KeyError(f"{uri}: no column {source.text_field!r} (columns: {short_list(paths, 50)}); set text_field on source"
                       f" {source.name!r} (a dotted path reaches into struct columns)")
    b = Batcher(source.name, relpath, batch_rows)
    row = 0
    for rb in pf.iter_batches(batch_size=batch_rows):
        for record in rb.to_pylist():
            raw = json.dumps(record, default=str, ensure_ascii=True).encode()
            check_record(b, row, record, raw, source)
            row += 1
        if b.full():
            yield from b.flush()
    yield from b.flush()
