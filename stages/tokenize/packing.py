"""The work of the tokenize stage, as plain functions (Ray tasks call them; tests call them directly).

1. :func:`encode_part` encodes one input file with the Rust batch API, appends EOS (BOS optional),
   decides train/validation per document, and writes the documents' tokens to an Arrow file.
2. :func:`pack_part` expands documents by their mixture copies, orders them (seeded), and packs
   the token stream into sequences of ``seq_len + 1`` tokens with no padding; the tail that does
   not fill a sequence goes back to the driver, which packs all tails together
   (:func:`pack_stream`), so only the last partial sequence of a split is lost.
3. :func:`write_shards` writes one slice of a seeded global permutation of all packed sequences as
   Arrow IPC shards.

A *stream* is a token array cut into *segments* (a document or the part of one that a stream
holds), each with the document id, source and copy number; :func:`pack_stream` cuts a stream into
sequences and records, per sequence, the segments it holds and where each starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pipeline import storage as st
from pipeline.io import PartOutputs, iter_parquet_batches
from stages.sample import keep_score

TRAIN, VALIDATION = "train", "validation"


def token_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65535 else pa.uint32()


def sequence_schema(seq_len: int, dtype: pa.DataType) -> pa.Schema:
    return pa.schema([
        ("tokens", pa.list_(dtype, seq_len + 1)),
        ("source", pa.string()),
        ("doc_ids", pa.list_(pa.string())),
        ("doc_offsets", pa.list_(pa.int32())),
        ("doc_copies", pa.list_(pa.int32())),
        ("seq_id", pa.int64()),
    ])


def validation_score(doc_id: str, seed: int) -> float:
    return keep_score(doc_id, seed ^ 0x5EED_0FF5)


def validation_thresholds(ids: list[str], sources: list[str], fraction: float, min_docs: int, seed: int) -> dict[str, float]:
    """Per source, the score below which a document is held out: ``fraction`` of the documents,
    but at least ``min_docs`` of them (and never all of a source's documents)."""
    scores: dict[str, list[float]] = {}
    for i, s in zip(ids, sources):
        scores.setdefault(s, []).append(validation_score(i, seed))
    out = {}
    for s, sc in scores.items():
        sc.sort()
        if len(sc) < 2:
            out[s] = 0.0  # a source's only document trains
            continue
        k = min(min_docs, len(sc) - 1)
        threshold = max(fraction, float(np.nextafter(sc[k - 1], 1.0)) if k > 0 else 0.0)
        out[s] = min(threshold, sc[-1])  # the highest-scoring document always trains
    return out


def is_validation(doc_id: str, threshold: float, seed: int) -> bool:
    return threshold > 0 and validation_score(doc_id, seed) < threshold


def copies_of(doc_id: str, rate: float, seed: int) -> int:
    """Deterministic up/down-sampling: floor(rate) copies plus one more with probability frac(rate)."""
    whole = int(np.floor(rate))
    return whole + (1 if keep_score(doc_id, seed ^ 0x0C0B1E5) < rate - whole else 0)


# -- Arrow IO helpers --------------------------------------------------------------------------------

def write_ipc(storage: st.Storage, uri: str, table: pa.Table) -> None:
    fs, path = storage.arrow_fs(uri)
    storage.makedirs(uri.rsplit("/", 1)[0])
    with fs.open_output_stream(path) as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def read_ipc(storage: st.Storage, uri: str) -> pa.Table:
    """Memory-mapped when local (zero copy), read into memory when remote."""
    if st.is_remote(uri):
        fs, path = storage.arrow_fs(uri)
        with fs.open_input_file(path) as f:
            return pa.ipc.open_file(f).read_all()
    return pa.ipc.open_file(pa.memory_map(uri)).read_all()


_TOKENIZERS: dict[str, Any] = {}


def cached_tokenizer(storage: st.Storage, uri: str):
    """One tokenizer per worker process; special-token strings inside documents stay plain text."""
    tok = _TOKENIZERS.get(uri)
    if tok is None:
        from stages.tokenizer import load_tokenizer

        tok = load_tokenizer(storage, uri)
        tok.encode_special_tokens = True  # a document that contains "<|eos|>" must not get an EOS id
        _TOKENIZERS[uri] = tok
    return tok


# -- 1. encode --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodeJob:
    tokenizer_uri: str
    eos_id: int
    bos_id: Optional[int]  # None: no BOS
    validation_fraction: float
    validation_thresholds: dict[str, float]  # per source (see validation_thresholds); others use the fraction
    seed: int
    batch_rows: int


def encode_part(storage: st.Storage, input_uri: str, out_uri: str, job: EncodeJob) -> dict[str, Any]:
    """Encode one input file; write id, source, split, tokens (with EOS); return counts."""
    tok = cached_tokenizer(storage, job.tokenizer_uri)
    tables, counts = [], {}
    docs = 0
    for batch in iter_parquet_batches(storage, input_uri, job.batch_rows, columns=["id", "text", "source"]):
        texts = batch.column("text").to_pylist()
        ids = batch.column("id").to_pylist()
        encodings = tok.encode_batch_fast([t or "" for t in texts], add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        extra = 1 + (job.bos_id is not None)
        values = np.empty(int(lengths.sum()) + extra * len(lengths), dtype=np.uint32)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths + extra, out=offsets[1:])
        for i, e in enumerate(encodings):
            start, end = offsets[i], offsets[i + 1]
            if job.bos_id is not None:
                values[start] = job.bos_id
                start += 1
            values[start : end - 1] = e.ids
            values[end - 1] = job.eos_id
        sources = batch.column("source").to_pylist()
        split = [VALIDATION if is_validation(i, job.validation_thresholds.get(s, job.validation_fraction), job.seed) else TRAIN for i, s in zip(ids, sources)]
        tokens = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
        tables.append(pa.table({"id": batch.column("id"), "source": batch.column("source"), "split": pa.array(split, pa.string()),
                                "tokens": tokens}))
        for s, src, n in zip(split, batch.column("source").to_pylist(), (lengths + extra).tolist()):
            c = counts.setdefault(s, {}).setdefault(src, {"docs": 0, "tokens": 0})
            c["docs"] += 1
            c["tokens"] += n
        docs += batch.num_rows
    if tables:
        write_ipc(storage, out_uri, pa.concat_tables(tables))
    return {"uri": out_uri if tables else None, "docs": docs, "counts": counts, "bytes_in": storage.size(input_uri)}


# -- 2. pack ----------------------------------------------------------------------------------------

@dataclass
class Stream:
    tokens: np.ndarray  # uint32
    seg_starts: np.ndarray  # int64, increasing, first is 0 when non-empty
    seg_ids: pa.Array  # string
    seg_sources: pa.Array  # string
    seg_copies: np.ndarray  # int32

    @staticmethod
    def empty() -> "Stream":
        return Stream(np.zeros(0, np.uint32), np.zeros(0, np.int64), pa.array([], pa.string()), pa.array([], pa.string()), np.zeros(0, np.int32))

    @staticmethod
    def concat(streams: list["Stream"]) -> "Stream":
        streams = [s for s in streams if len(s.tokens)]
        if not streams:
            return Stream.empty()
        base = np.cumsum([0] + [len(s.tokens) for s in streams[:-1]])
        return Stream(
            np.concatenate([s.tokens for s in streams]),
            np.concatenate([s.seg_starts + b for s, b in zip(streams, base)]),
            pa.concat_arrays([s.seg_ids for s in streams]),
            pa.concat_arrays([s.seg_sources for s in streams]),
            np.concatenate([s.seg_copies for s in streams]),
        )


def pack_stream(stream: Stream, seq_len: int, dtype: pa.DataType, seq_id_base: int) -> tuple[pa.Table, Stream]:
    """Cut a stream into full sequences of seq_len + 1 tokens; return them and the leftover tail."""
    L = seq_len + 1
    n_tok = len(stream.tokens)
    n_seq = n_tok // L
    cut = n_seq * L
    starts = stream.seg_starts
    seq_starts = np.arange(n_seq, dtype=np.int64) * L
    first = np.searchsorted(starts, seq_starts, side="right") - 1
    last = np.searchsorted(starts, seq_starts + L, side="left") - 1
    counts = last - first + 1
    list_offsets = np.zeros(n_seq + 1, dtype=np.int64)
    np.cumsum(counts, out=list_offsets[1:])
    flat = np.repeat(first - list_offsets[:-1], counts) + np.arange(list_offsets[-1])
    seq_of_flat = np.repeat(np.arange(n_seq), counts)
    offs = np.maximum(starts[flat] - seq_starts[seq_of_flat], 0).astype(np.int32)
    lo = pa.array(list_offsets.astype(np.int32))
    np_dtype = np.uint16 if dtype == pa.uint16() else np.uint32
    table = pa.table(
        {
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(stream.tokens[:cut].astype(np_dtype)), L),
            "source": stream.seg_sources.take(pa.array(first)),
            "doc_ids": pa.ListArray.from_arrays(lo, stream.seg_ids.take(pa.array(flat))),
            "doc_offsets": pa.ListArray.from_arrays(lo, pa.array(offs)),
            "doc_copies": pa.ListArray.from_arrays(lo, pa.array(stream.seg_copies[flat])),
            "seq_id": pa.array(seq_id_base + np.arange(n_seq, dtype=np.int64)),
        },
        schema=sequence_schema(seq_len, dtype),
    )
    if cut == n_tok:
        return table, Stream.empty()
    t0 = int(np.searchsorted(starts, cut, side="right") - 1)
    tail = Stream(
        stream.tokens[cut:].copy(),
        np.maximum(starts[t0:] - cut, 0),
        stream.seg_ids.slice(t0),
        stream.seg_sources.slice(t0),
        stream.seg_copies[t0:],
    )
    return table, tail


@dataclass(frozen=True)
class PackJob:
    seq_len: int
    dtype: str  # "uint16" | "uint32"
    seed: int
    rates: dict[str, float]  # train copies rate per source (1.0: as is)


def doc_stream(docs: pa.Table, copies: np.ndarray, order_seed: int) -> Stream:
    """The documents of one part, each repeated ``copies`` times, in a seeded order."""
    rows = np.repeat(np.arange(docs.num_rows), copies)
    copy_no = (np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)).astype(np.int32)
    order = np.random.default_rng(order_seed).permutation(len(rows))
    rows, copy_no = rows[order], copy_no[order]
    tokens = docs.column("tokens").combine_chunks()
    offsets = np.asarray(tokens.offsets)
    values = np.asarray(tokens.values)
    lens = offsets[rows + 1] - offsets[rows]
    seg_starts = np.zeros(len(rows), dtype=np.int64)
    np.cumsum(lens[:-1], out=seg_starts[1:])
    gather = np.repeat(offsets[rows] - seg_starts, lens) + np.arange(int(lens.sum()))
    idx = pa.array(rows)
    return Stream(values[gather], seg_starts, docs.column("id").combine_chunks().take(idx),
                  docs.column("source").combine_chunks().take(idx), copy_no)


def pack_part(storage: st.Storage, encoded_uri: str, part_index: int, out_prefix: str, job: PackJob) -> dict[str, Any]:
    """Pack one encoded part, per split; write full sequences, return tails and token counts."""
    import pyarrow.compute as pc

    docs = read_ipc(storage, encoded_uri)
    dtype = getattr(pa, job.dtype)()
    out: dict[str, Any] = {"files": {}, "tails": {}, "tokens": {}}
    for split in (TRAIN, VALIDATION):
        sel = docs.filter(pc.equal(docs.column("split"), split))
        if sel.num_rows == 0:
            continue
        if split == TRAIN:
            rates = [job.rates.get(s, 0.0) for s in sel.column("source").to_pylist()]
            copies = np.array([copies_of(i, r, job.seed) for i, r in zip(sel.column("id").to_pylist(), rates)], dtype=np.int64)
        else:
            copies = np.ones(sel.num_rows, dtype=np.int64)
        stream = doc_stream(sel, copies, order_seed=hash_seed(job.seed, part_index, split))
        lens = np.diff(np.append(stream.seg_starts, len(stream.tokens)))
        tok_per_source: dict[str, int] = {}
        for src, n in zip(stream.seg_sources.to_pylist(), lens.tolist()):
            tok_per_source[src] = tok_per_source.get(src, 0) + n
        out["tokens"][split] = tok_per_source
        table, tail = pack_stream(stream, job.seq_len, dtype, seq_id_base=part_index << 32)
        if table.num_rows:
            uri = f"{out_prefix}-{split}.arrow"
            write_ipc(storage, uri, table)
            out["files"][split] = {"uri": uri, "rows": table.num_rows}
        out["tails"][split] = tail
    return out


def hash_seed(seed: int, part_index: int, split: str) -> list[int]:
    return [seed, part_index, 0 if split == TRAIN else 1]


# -- 3. shuffle and write ---------------------------------------------------------------------------

def permutation(n: int, seed: int, split: str) -> np.ndarray:
    """The seeded global order of a split's sequences (numpy PCG64 permutation: uniform)."""
    return np.random.default_rng([seed, 0 if split == TRAIN else 1, 0x5_4FF1E]).permutation(n)


def write_shards(storage: st.Storage, split: str, packed: list[dict[str, Any]], rows: np.ndarray, part_id: str,
                 attempt_uri: str, attempt: str, shard_rows: int) -> dict[str, Any]:
    """Write the sequences at global positions ``rows`` (in that order) as Arrow IPC shards."""
    table = pa.concat_tables([read_ipc(storage, p["uri"]) for p in packed])  # zero copy when local
    taken = table.take(pa.array(rows))
    out = PartOutputs(storage, attempt_uri, attempt, part_id, shard_rows, None, {split: "arrow"})
    for start in range(0, taken.num_rows, shard_rows):
        out.write(split, taken.slice(start, shard_rows).combine_chunks())
    return out.close(rows_in=0)


def threads_env(threads: int) -> dict[str, str]:
    return {"RAYON_NUM_THREADS": str(threads), "RAYON_RS_NUM_CPUS": str(threads), "TOKENIZERS_PARALLELISM": "true"}


def local_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
