"""The distributed part shared by exact and near dedup.

64-bit hashes are stored as int64 (the same bits): Ray 2.60 turns uint64 group keys into pickled
Python objects that Arrow cannot sort.

1. **nodes and keys** (one task per input file, through ``ctx.fan_out``): per document a
   64-bit ``uid`` (hash of its id), the input file (``part``) it came from, what the keep rule
   needs (id, source, length) and its grouping keys (text hash, URL hash, or one LSH bucket per
   band). Node rows are written hash-partitioned by uid (``_work/nodes/p=K``); (key, uid) rows
   hash-partitioned by key (``_work/keys/p=K``): shuffles through storage, without Ray's
   aggregator actors (which cost ~6 s of start-up per groupby on small inputs and turn uint64
   keys into Python objects).
2. **edges** (one Ray task per key partition): sort the partition's ~2 M key rows and turn every
   bucket of k >= 2 documents into a star of k - 1 edges from its smallest uid -- never quadratic.
3. **verification** (optional, two shuffles): each edge meets the signature of its smaller end in
   that node's partition, then the signature of its other end; edges whose estimated Jaccard is
   below the threshold are dropped.
4. **connected components** (``components.py``: large-star/small-star rounds, one shuffle each),
   then **members** (each node partition joins its labels with its node rows) and **keepers**
   (members shuffled by component; one kept per component by the keep rule; removal rows written
   per input part: ``_work/removed/part-XXXXX/c-KKKKK.parquet``).
5. **routing** (``ctx.run_parts``, one part per input file): read the input file in batches, look
   the rows up in that part's removal files, yield kept rows and rejected rows with reasons.

Steps 2-4 are Ray tasks over P partitions exchanging numpy blocks / Arrow tables through Ray's
object store (``ctx.fan_out.exchange``); the driver holds object references and per-partition counts only.
A task holds one partition: O((key rows + edges + nodes) / P), and P grows with the input
(~2 M key rows per partition). Everything is ordered by values (uids, ids), never by task
completion order, so two runs give byte-identical outputs.
"""

from __future__ import annotations

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
from stages.dedup.components import both_ways, concat_rows, label_components, local_shuffle, pairs_of, route, select_keepers, unique_rows
from stages.dedup.normalize import hash_strings

log = logging.getLogger("lmpipe")


def uids_of(ids: pa.Array) -> np.ndarray:
    """64-bit node ids (hash of the document id): compact keys for the shuffles and the graph."""
    return hash_strings(ids)


def list_parquet(storage: st.Storage, uri: str) -> list[str]:
    if not storage.exists(uri):
        return []
    return sorted(f for f in storage.find_files(uri) if f.endswith(".parquet"))


def nodes_and_keys_of_part(storage: st.Storage, uri: str, part: int, work: str, columns: list[str], keys_fn,
                           key_columns: Sequence[str], partitions: int, batch_rows: int) -> dict[str, int]:
    """One input file, batch by batch: its node rows to ``_work/nodes/p=K`` by uid partition and
    its (key, uid) rows to ``_work/keys/p=K`` by key partition. File names come from the part
    and batch number, so a retried task overwrites its own files."""
    rows = 0
    for b, batch in enumerate(iter_parquet_batches(storage, uri, batch_rows, columns=columns)):
        if batch.num_rows == 0:
            continue
        rows += batch.num_rows
        ids = batch.column("id")
        uid = uids_of(ids)
        cols: dict[str, Any] = {
            "uid": pa.array(uid.view(np.int64), pa.int64()),
            "part": pa.array(np.full(batch.num_rows, part, np.int32), pa.int32()),
            "id": ids,
            "source": batch.column("source"),
            "length": pc.utf8_length(pc.fill_null(batch.column("text"), "")).cast(pa.int64()),
        }
        cols.update(keys_fn(batch))
        nodes = pa.table(cols)
        name = f"part-{part:05d}-{b:05d}.parquet"
        _write_routed(storage, st.join(work, "nodes"), name, route(nodes, uid, partitions))
        keyed = explode_keys(nodes, key_columns)
        _write_routed(storage, st.join(work, "keys"), name, route(keyed, keyed.column("key").to_numpy().view(np.uint64), partitions))
    return {"rows": rows}


def _write_routed(storage: st.Storage, folder: str, name: str, pieces: list[pa.Table]) -> None:
    for k, piece in enumerate(pieces):
        if piece.num_rows:
            sub = st.join(folder, f"p={k}")
            storage.makedirs(sub)
            fs, path = storage.arrow_fs(st.join(sub, name))
            pq.write_table(piece, path, filesystem=fs)


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


def read_partition(storage: st.Storage, folder: str, columns: list[str], batch_rows: int) -> Iterator[pa.Table]:
    for f in list_parquet(storage, folder):
        yield from iter_parquet_batches(storage, f, batch_rows, columns=columns)


def build_nodes_and_keys(ctx, work: str, columns: list[str], keys_fn, key_columns: Sequence[str], partitions: int) -> list[str]:
    """Step 1: one task per input file. Returns the input files."""
    t0 = time.perf_counter()
    files = ctx.inputs[0].files()
    res = ctx.resources
    items = [(ctx.storage, uri, i, work, columns, keys_fn, list(key_columns), partitions, res.batch_size) for i, uri in enumerate(files)]
    ctx.fan_out.map(nodes_and_keys_of_part, items, step="nodes and keys", num_cpus=res.num_cpus or 1, max_parallel=res.max_workers)
    log.info("[%s] nodes and keys written in %.1fs", ctx.stage_name, time.perf_counter() - t0)
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


def signature_matrix(col) -> np.ndarray:
    """A fixed_size_binary(4 * num_perm) column as a (rows x num_perm) uint32 matrix."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = col.type.byte_width // 4
    data = np.frombuffer(col.buffers()[1], dtype=np.uint32)
    return data[col.offset * width : (col.offset + len(col)) * width].reshape(len(col), width)


# -- the partition steps: fn(blocks, k, partitions, *args) -> (one block per partition, stats) -----

def keys_step(blocks, k: int, partitions: int, job: ComponentJob) -> tuple[list, dict]:
    """Key partition k -> star edges (smaller uid first); routed by the smaller end when they are
    to be verified, else both directions by node for the first large-star."""
    keys, uids = [], []
    for t in read_partition(job.storage, st.join(job.work, "keys", f"p={k}"), ["key", "uid"], job.batch_rows):
        keys.append(t.column("key").to_numpy())
        uids.append(t.column("uid").to_numpy())
    src, dst = bucket_edges(np.concatenate(keys) if keys else np.zeros(0, np.int64), np.concatenate(uids) if uids else np.zeros(0, np.int64))
    pairs = pairs_of(src, dst)
    if job.verify_threshold is not None:
        return route(pairs, pairs[:, 0], partitions), {}
    return both_ways(pairs, partitions), {}


def partition_signatures(job: ComponentJob, k: int, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted uids, their signatures) of the wanted uids of node partition k."""
    value_set = pa.array(wanted.view(np.int64), pa.int64())
    uids, sigs = [np.zeros(0, np.uint64)], []
    for batch in read_partition(job.storage, st.join(job.work, "nodes", f"p={k}"), ["uid", "signature"], job.batch_rows):
        batch = batch.filter(pc.is_in(batch.column("uid"), value_set=value_set))
        if batch.num_rows:
            uids.append(batch.column("uid").to_numpy().view(np.uint64))
            sigs.append(signature_matrix(batch.column("signature")))
    uid = np.concatenate(uids)
    order = np.argsort(uid, kind="stable")
    return uid[order], (np.concatenate(sigs)[order] if sigs else np.zeros((0, 0), np.uint32))


def verify_source_step(blocks, k: int, partitions: int, job: ComponentJob) -> tuple[list, dict]:
    """Edges (s, d) of the nodes s of partition k, deduplicated, each with s's signature; routed
    by d."""
    edges = unique_rows(concat_rows(blocks, 2))
    uid, sig = partition_signatures(job, k, np.unique(edges[:, 0]))
    sig_s = sig[np.searchsorted(uid, edges[:, 0])] if len(edges) else sig
    index = route(np.arange(len(edges)), edges[:, 1], partitions)
    return [(edges[i], sig_s[i]) for i in index], {"edges": int(len(edges))}


def verify_target_step(blocks, k: int, partitions: int, job: ComponentJob) -> tuple[list, dict]:
    """Compare with d's signature; keep the edges whose estimated Jaccard reaches the threshold."""
    blocks = [b for b in blocks if len(b[0])]
    if not blocks:
        return both_ways(np.zeros((0, 2), np.uint64), partitions), {"verified": 0}
    edges = np.concatenate([b[0] for b in blocks])
    sig_s = np.concatenate([b[1] for b in blocks])
    uid, sig = partition_signatures(job, k, np.unique(edges[:, 1]))
    sig_d = sig[np.searchsorted(uid, edges[:, 1])]
    keep = np.zeros(len(edges), dtype=bool)
    for s in range(0, len(edges), 65536):  # bounded temporaries
        keep[s : s + 65536] = (sig_s[s : s + 65536] == sig_d[s : s + 65536]).mean(axis=1) >= job.verify_threshold
    return both_ways(edges[keep], partitions), {"verified": int(keep.sum())}


def members_step(blocks, k: int, partitions: int, job: ComponentJob) -> tuple[list, dict]:
    """Labels (node, component, size) of partition k joined with its node rows (what the keep
    rule needs); routed by component. Also counts the partition's documents per source."""
    labels = concat_rows(blocks, 3)
    labels = labels[np.argsort(labels[:, 0], kind="stable")]
    wanted = pa.array(labels[:, 0].view(np.int64), pa.int64())
    cols = ["uid", "part", "id", "source", "length", *job.extra_columns]
    per_source: dict[str, int] = {}
    pieces = []
    for batch in read_partition(job.storage, st.join(job.work, "nodes", f"p={k}"), cols, job.batch_rows):
        for item in pc.value_counts(batch.column("source")).to_pylist():
            per_source[item["values"]] = per_source.get(item["values"], 0) + int(item["counts"])
        if len(labels):
            batch = batch.filter(pc.is_in(batch.column("uid"), value_set=wanted))
            if batch.num_rows:
                pieces.append(batch)
    stats = {"documents_per_source": per_source}
    if not pieces:
        return [None] * partitions, stats
    members = pa.concat_tables(pieces)
    pos = np.searchsorted(labels[:, 0], members.column("uid").to_numpy().view(np.uint64))
    component = labels[pos, 1]
    # a uid shared by two ids (a 64-bit collision, or a repeated id) counts once in `size`
    members = members.append_column("component", pa.array(component.view(np.int64), pa.int64()))
    members = members.append_column("size", pa.array(labels[pos, 2].astype(np.int64), pa.int64()))
    return route(members, component, partitions), stats


def keepers_step(blocks, k: int, partitions: int, job: ComponentJob, reason_fn: Callable[[pa.Table, pa.Table], pa.Array]) -> tuple[list, dict]:
    """Whole components of partition k: one keeper each; removal rows written per input part."""
    stats: dict[str, Any] = {"members": 0, "components": 0, "removed": 0, "removed_per_source": {}, "component_sizes": {}}
    tables = [b for b in blocks if b is not None and b.num_rows]
    if not tables:
        return [None] * partitions, stats
    decided = select_keepers(pa.concat_tables(tables), job.keep, job.priority)
    keepers = decided.filter(decided.column("keeper"))
    sizes, counts = np.unique(keepers.column("size").to_numpy(), return_counts=True)
    stats.update(members=int(decided.num_rows), components=int(keepers.num_rows),
                 component_sizes={int(s): int(c) for s, c in zip(sizes, counts)})
    removed = decided.filter(pc.invert(decided.column("keeper")))
    if removed.num_rows:
        # reason_fn compares each removed row with its keeper (e.g. same text hash or only same URL)
        keeper_index = pc.index_in(removed.column("duplicate_of"), value_set=keepers.column("id"))
        removed = removed.append_column(DROP_REASON, reason_fn(removed, keepers.take(keeper_index)))
        stats["removed"] = int(removed.num_rows)
        stats["removed_per_source"] = {item["values"]: int(item["counts"]) for item in pc.value_counts(removed.column("source")).to_pylist()}
    parts = removed.column("part").to_numpy() if removed.num_rows else np.zeros(0, np.int32)
    for p in np.unique(parts):
        table = removed.filter(pa.array(parts == p)).sort_by([("id", "ascending")])
        table = table.select(["id", DROP_REASON, "duplicate_of", "component", "size"])
        folder = st.join(job.work, "removed", f"part-{int(p):05d}")
        job.storage.makedirs(folder)
        fs, path = job.storage.arrow_fs(st.join(folder, f"c-{k:05d}.parquet"))
        pq.write_table(table, path, filesystem=fs)
    return [None] * partitions, stats


# -- running the steps ------------------------------------------------------------------------------

def _merge_counts(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for key, n in d.items():
            out[key] = out.get(key, 0) + n
    return dict(sorted(out.items()))


def components_and_removals(job: ComponentJob, reason_fn, partitions: int, shuffle=local_shuffle, name: str = "dedup") -> dict[str, Any]:
    """Steps 2-4 over ``partitions`` partitions (``ctx.fan_out.exchange`` in the stage,
    ``local_shuffle`` in one process). Writes the removal files; returns the counts."""
    t0 = time.perf_counter()
    P = partitions
    blocks, _ = shuffle(keys_step, [[] for _ in range(P)], P, job)
    stats: dict[str, Any] = {"partitions": P}
    if job.verify_threshold is not None:
        forward, st1 = shuffle(verify_source_step, blocks, P, job)
        blocks, st2 = shuffle(verify_target_step, forward, P, job)
        stats["edges"] = sum(s["edges"] for s in st1)
        stats["verified_edges"] = sum(s["verified"] for s in st2)
        del forward

    def on_round(rounds: int, edges: int) -> None:
        if rounds == 1 and job.verify_threshold is None:
            stats["edges"] = stats["verified_edges"] = edges
        log.info("[%s] components: large-star round %d over %d edges", name, rounds, edges)

    labels, stats["rounds"] = label_components(shuffle, blocks, P, on_round)
    del blocks
    members, st_members = shuffle(members_step, labels, P, job)
    del labels
    _, st_keep = shuffle(keepers_step, members, P, job, reason_fn)
    stats["documents_per_source"] = _merge_counts(s["documents_per_source"] for s in st_members)
    for key in ("members", "components", "removed"):
        stats[key] = sum(s[key] for s in st_keep)
    stats["removed_per_source"] = _merge_counts(s["removed_per_source"] for s in st_keep)
    stats["component_sizes"] = _merge_counts(s["component_sizes"] for s in st_keep)
    stats.setdefault("edges", 0)
    stats.setdefault("verified_edges", stats["edges"])
    log.info("[%s] %d partitions: %d candidate edges, %d verified, %d components, %d removed in %.1fs (%d rounds)",
             name, P, stats["edges"], stats["verified_edges"], stats["components"], stats["removed"], time.perf_counter() - t0, stats["rounds"])
    return stats


def route_part(storage: st.Storage, uri: str, removed_uri: Optional[str], batch_size: int, count) -> Iterator[pa.Table]:
    """Step 5: yield the part's kept rows as they are, and its removed rows with reason columns.
    ``removed_uri``: the part's folder of removal files (one per component partition)."""
    removed = None
    if removed_uri:
        tables = []
        for f in list_parquet(storage, removed_uri):
            fs, path = storage.arrow_fs(f)
            tables.append(pq.read_table(path, filesystem=fs))
        removed = pa.concat_tables(tables) if tables else None
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
