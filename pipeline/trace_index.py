"""Where a key (a document id) lies in a committed stage output, without reading the output again:
an index of one column (key -> file, row) that ``lmpipe trace`` builds the first time it asks,
stored under ``<work_dir>/_trace/<stage>/<fingerprint>/`` and named by the digest of the output's
manifest -- a recomputed or recommitted output has another manifest, so a stale index is never
read, and no stage's own files change. The index is sorted by key and written in row groups, so a
lookup reads only the row groups whose min/max statistics can hold the keys. A list column (the
document ids of a packed sequence) is indexed element by element. ``_trace/`` is a cache: it can
be deleted at any time (``lmpipe gc`` leaves ``_`` folders alone).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import manifest as mf
from pipeline import storage as st

INDEX_DIR = "_trace"
INDEX_ROW_GROUP = 1 << 16


def manifest_digest(storage: st.Storage, stage_dir: str) -> str:
    return hashlib.sha256(storage.read_bytes(mf.manifest_uri(stage_dir))).hexdigest()[:16]


def schema_columns(manifest: dict[str, Any], dataset: str) -> set[str]:
    """The top-level column names of a dataset, from the schema text its manifest records."""
    schema = (manifest["datasets"].get(dataset) or {}).get("schema") or ""
    return {line.split(":", 1)[0] for line in schema.splitlines() if line and not line.startswith(" ")}


def read_column(storage: st.Storage, uri: str, column: str) -> pa.ChunkedArray:
    fs, path = storage.arrow_fs(uri)
    if uri.endswith(".arrow"):
        with fs.open_input_file(path) as f:
            return pa.ipc.open_file(f).read_all().column(column)
    return pq.read_table(path, filesystem=fs, columns=[column]).column(column)


class OutputIndex:
    """Lookups of keys in the committed outputs of one work dir, through lazily built indexes."""

    def __init__(self, storage: st.Storage, work_dir: str):
        self.storage, self.work_dir = storage, work_dir
        self.built: list[str] = []  # the indexes this process had to build (the rest were cached)

    def _index_uri(self, stage_dir: str, manifest: dict[str, Any], dataset: str, column: str) -> str:
        return st.join(self.work_dir, INDEX_DIR, manifest["stage"], manifest["fingerprint"],
                       f"{dataset}.{column}.{manifest_digest(self.storage, stage_dir)}.parquet")

    def _build(self, uri: str, files: list[str], column: str) -> None:
        parts = []
        for k, f in enumerate(files):
            values = read_column(self.storage, f, column).combine_chunks()
            if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
                rows = pc.list_parent_indices(values)
                values = pc.list_flatten(values)
            else:
                rows = pa.array(range(len(values)), pa.int64())
            parts.append(pa.table({"key": values.cast(pa.string()), "file": pa.array([k] * len(values), pa.int32()),
                                   "row": rows.cast(pa.int64())}))
        table = pa.concat_tables(parts) if parts else pa.table({"key": pa.array([], pa.string()), "file": pa.array([], pa.int32()),
                                                               "row": pa.array([], pa.int64())})
        table = table.filter(pc.is_valid(table.column("key"))).sort_by([("key", "ascending"), ("file", "ascending"), ("row", "ascending")])
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=INDEX_ROW_GROUP, compression="zstd")
        self.storage.write_bytes_atomic(uri, buf.getvalue())
        self.built.append(uri)

    def lookup(self, stage_dir: str, manifest: dict[str, Any], dataset: str, column: str,
               keys: Iterable[str]) -> dict[str, list[tuple[str, int]]]:
        """For each key found in ``column`` of ``dataset``: the (file, row) places that hold it, in
        file and row order."""
        keys = sorted(set(keys))
        files = mf.dataset_files(manifest, stage_dir, dataset)
        if not keys or not files:
            return {}
        uri = self._index_uri(stage_dir, manifest, dataset, column)
        if not self.storage.exists(uri):
            self._build(uri, files, column)
        fs, path = self.storage.arrow_fs(uri)
        found = pq.read_table(path, filesystem=fs, filters=[("key", "in", keys)])
        out: dict[str, list[tuple[str, int]]] = {}
        for key, k, row in zip(*(found.column(c).to_pylist() for c in ("key", "file", "row"))):
            out.setdefault(key, []).append((files[k], row))
        return out


def read_rows(storage: st.Storage, places: list[tuple[str, int]], columns: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """The rows at (file, row) places, as dicts, in the order given: each Parquet file reads only the
    row groups that hold them, each Arrow IPC file only their record batches."""
    by_file: dict[str, list[int]] = {}
    for f, row in places:
        by_file.setdefault(f, []).append(row)
    got: dict[tuple[str, int], dict[str, Any]] = {}
    for f, rows in by_file.items():
        fs, path = storage.arrow_fs(f)
        with fs.open_input_file(path) as handle:
            if f.endswith(".arrow"):
                reader = pa.ipc.open_file(handle)
                sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
                get = lambda i: reader.get_batch(i)  # noqa: E731 - one reader per file
            else:
                reader = pq.ParquetFile(handle)
                sizes = [reader.metadata.row_group(i).num_rows for i in range(reader.num_row_groups)]
                get = lambda i: reader.read_row_group(i, columns=columns)  # noqa: E731
            starts = [0]
            for n in sizes:
                starts.append(starts[-1] + n)
            batches: dict[int, Any] = {}
            for row in rows:
                group = next(i for i in range(len(sizes)) if starts[i] <= row < starts[i + 1])
                if group not in batches:
                    batches[group] = get(group)
                record = batches[group].slice(row - starts[group], 1).to_pylist()[0]
                got[(f, row)] = {k: v for k, v in record.items() if columns is None or k in columns}
    return [got[p] for p in places]
