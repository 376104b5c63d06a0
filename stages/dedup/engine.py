"""The distributed part shared by exact and near dedup.

64-bit hashes are stored as int64 (the same bits): Ray 2.60 turns uint64 group keys into pickled
Python objects that Arrow cannot sort.

1. **nodes and keys** (Ray Data ``map_batches`` over the input, in parallel): per document a
   64-bit ``uid`` (hash of its id), the input file (``part``) it came from, what the keep rule
   needs (id, source, length) and its grouping keys (text hash, URL hash, or one LSH bucket per
   band). Node rows go to ``_work/nodes``; (key, uid) rows are written hash-partitioned by key
   (``_work/keys/p=K``): a shuffle through storage, without Ray's aggregator actors (which cost
   ~6 s of start-up per groupby on small inputs and turn uint64 keys into Python objects).
2. **edges** (Ray Data over the P partitions): each reducer loads one partition (~2 M key rows
   by default), sorts it, and turns every bucket of k >= 2 documents into a star of k - 1 edges
   from its smallest uid -- never quadratic. Written to ``_work/edges``.
3. **components** (one Ray task): connected components of the edges (scipy), the members' keep
   information streamed from ``_work/nodes`` (filtered to the members), one keeper per component,
   and one removal file per input part: ``_work/removed/part-XXXXX.parquet``. Memory is
   O(duplicate documents + edges), not O(corpus).
4. **routing** (``ctx.run_parts``, one part per input file): read the input file in batches, look
   the rows up in that part's removal file, yield kept rows and rejected rows with reasons.

Everything is ordered by values (uids, ids), never by task completion order, so two runs give
byte-identical outputs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.io import iter_parquet_batches
from pipeline.stage import DROP_REASON
from stages.dedup.components import connected_components, select_keepers
from stages.dedup.normalize import hash_strings

log = logging.getLogger("lmpipe")
NODE_BASE = ("uid", "part", "id", "source", "length")


def uids_of(ids: pa.Array) -> np.ndarray:
    """64-bit node ids (hash of the document id): compact keys for the shuffles and the graph."""
    return hash_strings(ids)


def _arrow_path(storage: st.Storage, uri: str) -> tuple[Any, str]:
    fs, path = storage.arrow_fs(uri)
    return fs, path


def read_input(ctx, columns: list[str]):
    """The input dataset with a ``part`` column (index of the input file each row came from)."""
    import ray.data

    files = ctx.inputs[0].files()
    fs = None
    paths = files
    if files and st.is_remote(files[0]):
        fs, _ = ctx.storage.arrow_fs(files[0])
        paths = [f.split("://", 1)[1] for f in files]
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, override_num_blocks=max(1, len(files)))
    ds = ds.select_columns([*columns, "path"])
    index = {p: i for i, p in enumerate(paths)}
    return ds, files, index


def list_parquet(storage: st.Storage, uri: str) -> list[str]:
    if not storage.exists(uri):
        return []
    return sorted(f for f in storage.find_files(uri) if f.endswith(".parquet"))


class NodeMapper:
    """Ray Data UDF over input rows (with ``path``): writes this batch's node rows to
    ``_work/nodes`` (a name derived from the rows, so a retried task overwrites its own file) and
    returns its (key, uid, p) rows, ``p`` being the key's shuffle partition."""

    def __init__(self, storage: st.Storage, work: str, path_index: dict[str, int], keys_fn, key_columns: Sequence[str], partitions: int):
        self.storage = storage
        self.work = work
        self.path_index = path_index
        self.keys_fn = keys_fn
        self.key_columns = list(key_columns)
        self.partitions = partitions

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return pa.table({"key": pa.array([], pa.int64()), "uid": pa.array([], pa.int64()), "p": pa.array([], pa.int32())})
        paths = batch.column("path").to_pylist()
        part = np.array([self.path_index[p] for p in paths], dtype=np.int32)
        ids = batch.column("id")
        uid = uids_of(ids)
        cols: dict[str, Any] = {
            "uid": pa.array(uid.view(np.int64), pa.int64()),
            "part": pa.array(part, pa.int32()),
            "id": ids,
            "source": batch.column("source"),
            "length": pc.utf8_length(pc.fill_null(batch.column("text"), "")).cast(pa.int64()),
        }
        cols.update(self.keys_fn(batch))
        nodes = pa.table(cols)
        name = f"nodes-{int(part[0]):05d}-{int(uid[0]):016x}-{batch.num_rows}.parquet"
        folder = st.join(self.work, "nodes")
        self.storage.makedirs(folder)
        fs, path = self.storage.arrow_fs(st.join(folder, name))
        pq.write_table(nodes, path, filesystem=fs)
        keyed = explode_keys(nodes, self.key_columns)
        p = (keyed.column("key").to_numpy().view(np.uint64) % np.uint64(self.partitions)).astype(np.int32)
        return keyed.append_column("p", pa.array(p, pa.int32()))


def explode_keys(batch: pa.Table, key_columns: Sequence[str]) -> pa.Table:
    """(key, uid) rows for every non-null key of every document."""
    uid = batch.column("uid").to_numpy()
    keys, uids = [], []
    for name in key_columns:
        col = batch.column(name)
        valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
        keys.append(pc.fill_null(col, 0).to_numpy(zero_copy_only=False)[valid])
        uids.append(uid[valid])
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    uid_all = np.concatenate(uids) if uids else np.zeros(0, np.int64)
    return pa.table({"key": pa.array(key, pa.int64()), "uid": pa.array(uid_all, pa.int64())})


def bucket_edges(key: np.ndarray, uid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges of every bucket (rows with the same key), from the bucket's smallest uid."""
    if len(key) == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty
    key = key.view(np.uint64)
    uid = uid.view(np.uint64)
    order = np.lexsort((uid, key))
    key, uid = key[order], uid[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    center = uid[np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))]
    keep = ~first & (uid != center)  # the center itself, and a uid repeated in a bucket, add nothing
    return center[keep], uid[keep]


class PartitionReducer:
    """Ray Data UDF over partition numbers: all key rows of one partition -> its star edges."""

    def __init__(self, storage: st.Storage, work: str):
        self.storage = storage
        self.work = work

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for p in batch.column("p").to_pylist():
            files = list_parquet(self.storage, st.join(self.work, "keys", f"p={p}"))
            keys, uids = [], []
            for f in files:
                fs, path = self.storage.arrow_fs(f)
                t = pq.read_table(path, filesystem=fs, columns=["key", "uid"])
                keys.append(t.column("key").to_numpy())
                uids.append(t.column("uid").to_numpy())
            src, dst = bucket_edges(np.concatenate(keys) if keys else np.zeros(0, np.int64), np.concatenate(uids) if uids else np.zeros(0, np.int64))
            table = pa.table({"src": pa.array(src.view(np.int64), pa.int64()), "dst": pa.array(dst.view(np.int64), pa.int64())})
            folder = st.join(self.work, "edges")
            self.storage.makedirs(folder)
            fs, path = self.storage.arrow_fs(st.join(folder, f"edges-{p:05d}.parquet"))
            pq.write_table(table, path, filesystem=fs)
            out.append(len(src))
        return pa.table({"edges": pa.array(out, pa.int64())})


def build_nodes_and_edges(ctx, work: str, columns: list[str], keys_fn, key_columns: Sequence[str], partitions: int) -> list[str]:
    """Steps 1 and 2 (two Ray Data jobs). Returns the input files."""
    import ray.data

    t0 = time.perf_counter()
    ds, files, index = read_input(ctx, columns)
    if not files:
        return files
    mapper = NodeMapper(ctx.storage, work, index, keys_fn, key_columns, partitions)
    keyed = ds.map_batches(mapper, batch_format="pyarrow", batch_size=ctx.resources.batch_size, num_cpus=ctx.resources.num_cpus or 1)
    keys_uri = st.join(work, "keys")
    ctx.storage.makedirs(keys_uri)
    fs, path = ctx.storage.arrow_fs(keys_uri)
    keyed.write_parquet(path, filesystem=fs, partition_cols=["p"])
    log.info("[%s] nodes and keys written in %.1fs", ctx.stage_name, time.perf_counter() - t0)
    t0 = time.perf_counter()
    reducers = ray.data.from_items([{"p": p} for p in range(partitions)], override_num_blocks=partitions)
    reducers.map_batches(PartitionReducer(ctx.storage, work), batch_format="pyarrow", batch_size=1, num_cpus=1).materialize()
    log.info("[%s] %d key partitions reduced to edges in %.1fs", ctx.stage_name, partitions, time.perf_counter() - t0)
    return files


@dataclass(frozen=True)
class ComponentJob:
    storage: st.Storage
    work: str
    keep: str
    priority: tuple[str, ...]
    extra_columns: tuple[str, ...]  # node columns the reason function needs (e.g. text_key)
    verify_threshold: Optional[float] = None  # drop edges whose signature-estimated Jaccard is lower
    batch_rows: int = 65536


def unique_edges(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each undirected edge once (a pair of near-identical documents shares many bands)."""
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    order = np.lexsort((hi, lo))
    lo, hi = lo[order], hi[order]
    keep = np.ones(len(lo), dtype=bool)
    keep[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[keep], hi[keep]


def signature_matrix(col) -> np.ndarray:
    """A fixed_size_binary(4 * num_perm) column as a (rows x num_perm) uint32 matrix."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = col.type.byte_width // 4
    data = np.frombuffer(col.buffers()[1], dtype=np.uint32)
    return data[col.offset * width : (col.offset + len(col)) * width].reshape(len(col), width)


def verify_edges(job: "ComponentJob", src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the edges whose MinHash-estimated Jaccard reaches ``job.verify_threshold``. Loads the
    signatures of edge endpoints only (num_perm x 4 bytes each)."""
    nodes = np.unique(np.concatenate([src, dst]))
    wanted = pa.array(nodes.view(np.int64), pa.int64())
    uids, sigs = [], []
    for f in list_parquet(job.storage, st.join(job.work, "nodes")):
        for batch in iter_parquet_batches(job.storage, f, job.batch_rows, columns=["uid", "signature"]):
            mask = pc.is_in(batch.column("uid"), value_set=wanted)
            if pc.any(mask).as_py():
                batch = batch.filter(mask)
                uids.append(batch.column("uid").to_numpy().view(np.uint64))
                sigs.append(signature_matrix(batch.column("signature")))
    uid = np.concatenate(uids)
    sig = np.concatenate(sigs)
    order = np.argsort(uid, kind="stable")
    uid, sig = uid[order], sig[order]
    keep = np.zeros(len(src), dtype=bool)
    for s in range(0, len(src), 65536):
        a = sig[np.searchsorted(uid, src[s : s + 65536])]
        b = sig[np.searchsorted(uid, dst[s : s + 65536])]
        keep[s : s + 65536] = (a == b).mean(axis=1) >= job.verify_threshold
    return src[keep], dst[keep]


def components_and_removals(job: ComponentJob, reason_fn: Callable[[pa.Table], pa.Array]) -> dict[str, Any]:
    """Step 3 (runs as one Ray task). Writes one removal file per input part that has removals."""
    edge_files = list_parquet(job.storage, st.join(job.work, "edges"))
    src_parts, dst_parts = [], []
    for f in edge_files:
        for batch in iter_parquet_batches(job.storage, f, job.batch_rows):
            src_parts.append(batch.column("src").to_numpy().view(np.uint64))
            dst_parts.append(batch.column("dst").to_numpy().view(np.uint64))
    src = np.concatenate(src_parts) if src_parts else np.zeros(0, np.uint64)
    dst = np.concatenate(dst_parts) if dst_parts else np.zeros(0, np.uint64)
    src, dst = unique_edges(src, dst)
    edges = len(src)
    if job.verify_threshold is not None and edges:
        src, dst = verify_edges(job, src, dst)
    verified = len(src)
    nodes, component, size = connected_components(src, dst)
    del src, dst
    # the keep information of the members, streamed from the node files
    wanted = pa.array(nodes.view(np.int64), pa.int64())
    cols = ["uid", "part", "id", "source", "length", *job.extra_columns]
    pieces = []
    per_source: dict[str, int] = {}
    for f in list_parquet(job.storage, st.join(job.work, "nodes")):
        for batch in iter_parquet_batches(job.storage, f, job.batch_rows, columns=cols):
            for item in pc.value_counts(batch.column("source")).to_pylist():
                per_source[item["values"]] = per_source.get(item["values"], 0) + int(item["counts"])
            mask = pc.is_in(batch.column("uid"), value_set=wanted)
            if pc.any(mask).as_py():
                pieces.append(batch.filter(mask))
    members = pa.concat_tables(pieces) if pieces else pa.table({c: pa.array([], pa.string()) for c in cols})
    if members.num_rows:
        pos = np.searchsorted(nodes, members.column("uid").to_numpy().view(np.uint64))
        members = members.append_column("component", pa.array(component[pos].view(np.int64), pa.int64())).append_column("size", pa.array(size[pos], pa.int64()))
        # a uid shared by two ids (a 64-bit collision, or a repeated id) counts once in `size`
    decided = select_keepers(members, job.keep, job.priority) if members.num_rows else None
    stats: dict[str, Any] = {"edges": int(edges), "verified_edges": int(verified), "members": int(members.num_rows), "components": 0, "removed": 0,
                             "removed_per_source": {}, "component_sizes": {},
                             "documents_per_source": dict(sorted(per_source.items()))}
    if decided is None:
        return stats
    keepers = decided.filter(decided.column("keeper"))
    sizes, counts = np.unique(keepers.column("size").to_numpy(), return_counts=True)
    stats["component_sizes"] = {int(s): int(c) for s, c in zip(sizes, counts)}
    stats["components"] = int(keepers.num_rows)
    removed = decided.filter(pc.invert(decided.column("keeper")))
    if removed.num_rows:
        # reason_fn compares each removed row with its keeper (e.g. same text hash or only same URL)
        keeper_index = pc.index_in(removed.column("duplicate_of"), value_set=keepers.column("id"))
        removed = removed.append_column(DROP_REASON, reason_fn(removed, keepers.take(keeper_index)))
    stats["removed"] = int(removed.num_rows)
    for item in pc.value_counts(removed.column("source")).to_pylist() if removed.num_rows else []:
        stats["removed_per_source"][item["values"]] = int(item["counts"])
    out_dir = st.join(job.work, "removed")
    job.storage.makedirs(out_dir)
    parts = removed.column("part").to_numpy() if removed.num_rows else np.zeros(0, np.int32)
    for p in np.unique(parts):
        table = removed.filter(pa.array(parts == p)).sort_by([("id", "ascending")])
        table = table.select(["id", DROP_REASON, "duplicate_of", "component", "size"])
        fs, path = job.storage.arrow_fs(st.join(out_dir, f"part-{int(p):05d}.parquet"))
        pq.write_table(table, path, filesystem=fs)
    return stats


def route_part(storage: st.Storage, uri: str, removed_uri: Optional[str], batch_size: int, count) -> Iterator[pa.Table]:
    """Step 4: yield the part's kept rows as they are, and its removed rows with reason columns."""
    removed = None
    if removed_uri:
        fs, path = storage.arrow_fs(removed_uri)
        removed = pq.read_table(path, filesystem=fs)
    for batch in iter_parquet_batches(storage, uri, batch_size):
        count("rows_in", batch.num_rows)
        if removed is None or removed.num_rows == 0:
            yield batch
            continue
        idx = pc.index_in(batch.column("id"), value_set=removed.column("id"))
        hit = pc.is_valid(idx)
        if not pc.any(hit).as_py():
            yield batch
            continue
        yield batch.filter(pc.invert(hit))
        rows = removed.take(idx.filter(hit))
        rejected = batch.filter(hit)
        rejected = rejected.append_column(DROP_REASON, rows.column(DROP_REASON))
        rejected = rejected.append_column("duplicate_of", rows.column("duplicate_of"))
        rejected = rejected.append_column("dup_component", rows.column("component"))
        rejected = rejected.append_column("dup_component_size", rows.column("size"))
        yield rejected
