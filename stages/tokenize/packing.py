"""The work of the tokenize stage, as plain functions (Ray tasks call them; tests call them directly).

0. :func:`score_part` reads one input file's ``id`` and ``source`` columns and returns, per source,
   the document count, the ``min_docs`` smallest validation scores and the largest one. The
   driver merges these (O(sources x min_docs), never per document) into one threshold per source
   (:func:`thresholds_from_summary`): the held-out set is exactly the one a sort of all scores
   would give.
1. :func:`encode_part` encodes one input file with the Rust batch API, appends EOS (BOS optional),
   decides train/validation per document, and streams the documents' tokens to an Arrow file.
2. :func:`pack_part` expands documents by their mixture copies, orders them (seeded), packs the
   token stream into sequences of ``seq_len + 1`` tokens with no padding, and sends each sequence
   to one of B *buckets* by a keyed hash of (seed, split, seq_id) (:func:`bucket_of`). It writes
   one file per split holding each bucket as one Arrow IPC message, plus an index of offsets
   (:func:`write_bucketed`). The tail that does not fill a
   sequence goes to a small file; :func:`pack_tails` packs all parts' tails together in one task
   (only the last partial sequence of a split is lost) and buckets them the same way.
3. :func:`write_bucket` (one task per bucket) reads bucket b of every packed file (two ranged
   reads: 16 bytes of the file's index, then the bucket's bytes; nothing else), shuffles those sequences with a permutation seeded by (seed, split, b),
   and writes them as one Arrow IPC shard in record batches of :func:`rows_per_batch` rows.

So every packed byte is read exactly once by the writers (the summary records bytes written and
read), no task holds more than one part or one bucket, and the driver holds counts, thresholds and
file lists only. B depends on the expected number of sequences and ``shard_sequences``
(:func:`num_buckets`), never on the number of workers, and bucket, order and file names derive
from the seed, the split and seq_id only: the same config and input give byte-identical shards
however many workers run them.

A *stream* is a token array cut into *segments* (a document or the part of one that a stream
holds), each with the document id, source and copy number; :func:`pack_stream` cuts a stream into
sequences and records, per sequence, the segments it holds and where each starts.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa

from pipeline import storage as st
from pipeline.contracts import PartResult
from pipeline.io import PartOutputs, iter_parquet_batches
from stages.sample.stage import keep_score
from stages.tokenize.hashing import mix64
from stages.tokenize.shards import ROWS_PER_BATCH_KEY

TRAIN, VALIDATION = "train", "validation"
SPLIT_CODE = {TRAIN: 0, VALIDATION: 1}


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


def rows_per_batch(seq_len: int, dtype: pa.DataType, target_bytes: int = 1 << 20) -> int:
    """Sequences per shard record batch: about ``target_bytes`` of tokens (at least one sequence)."""
    return max(1, target_bytes // ((seq_len + 1) * dtype.bit_width // 8))


# -- 0. validation thresholds, from per-source summaries ---------------------------------------------

def validation_score(doc_id: str, seed: int) -> float:
    return keep_score(doc_id, seed ^ 0x5EED_0FF5)


def summarize_scores(ids: Iterable[str], sources: Iterable[str], seed: int, k: int) -> dict[str, dict[str, Any]]:
    """Per source: ``count``, the ``k`` smallest validation scores (ascending) and the ``largest``."""
    out: dict[str, dict[str, Any]] = {}
    for i, s in zip(ids, sources):
        score = validation_score(i, seed)
        cur = out.get(s)
        if cur is None:
            out[s] = {"count": 1, "smallest": [-score] if k else [], "largest": score}
            continue
        cur["count"] += 1
        cur["largest"] = max(cur["largest"], score)
        if k:
            heap = cur["smallest"]  # a max-heap of the k smallest, as negated scores
            if len(heap) < k:
                heapq.heappush(heap, -score)
            elif -heap[0] > score:
                heapq.heapreplace(heap, -score)
    for cur in out.values():
        cur["smallest"] = sorted(-x for x in cur["smallest"])
    return out


def merge_score_summaries(parts: Iterable[dict[str, dict[str, Any]]], k: int) -> dict[str, dict[str, Any]]:
    """The summary of the union of the parts' documents (what :func:`summarize_scores` gives on all)."""
    out: dict[str, dict[str, Any]] = {}
    for part in parts:
        for s, cur in part.items():
            acc = out.setdefault(s, {"count": 0, "smallest": [], "largest": -1.0})
            acc["count"] += cur["count"]
            acc["largest"] = max(acc["largest"], cur["largest"])
            acc["smallest"] = sorted(acc["smallest"] + cur["smallest"])[:k]
    return dict(sorted(out.items()))


def thresholds_from_summary(summary: dict[str, dict[str, Any]], fraction: float, min_docs: int) -> dict[str, float]:
    """Per source, the score below which a document is held out: ``fraction`` of the documents,
    but at least ``min_docs`` of them (and never all of a source's documents).

    The minimum needs only the ``min_docs`` smallest scores of the source (the threshold sits just
    above the k-th smallest) and "never all" only the largest, so a summary of O(min_docs) numbers
    per source gives exactly the thresholds a sort of every score would."""
    out = {}
    for s, cur in summary.items():
        if cur["count"] < 2:
            out[s] = 0.0  # a source's only document trains
            continue
        k = min(min_docs, cur["count"] - 1)
        threshold = max(fraction, float(np.nextafter(cur["smallest"][k - 1], 1.0)) if k > 0 else 0.0)
        out[s] = min(threshold, cur["largest"])  # the highest-scoring document always trains
    return out


def validation_thresholds(ids: list[str], sources: list[str], fraction: float, min_docs: int, seed: int) -> dict[str, float]:
    """:func:`thresholds_from_summary` over the given documents (one part)."""
    return thresholds_from_summary(summarize_scores(ids, sources, seed, min_docs), fraction, min_docs)


def score_part(storage: st.Storage, input_uri: str, seed: int, k: int, batch_rows: int) -> dict[str, dict[str, Any]]:
    """The validation score summary of one input file (reads its ``id`` and ``source`` columns only)."""
    parts = []
    for batch in iter_parquet_batches(storage, input_uri, max(batch_rows, 8192), columns=["id", "source"]):
        parts.append(summarize_scores(batch.column("id").to_pylist(), batch.column("source").to_pylist(), seed, k))
    return merge_score_summaries(parts, k)


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


def read_range(storage: st.Storage, uri: str, start: int, length: int) -> bytes:
    """``length`` bytes at ``start`` of a file: one ranged GET on S3, a seek and read locally."""
    if length <= 0:
        return b""
    if st.is_remote(uri):
        return storage.fs(uri).cat_file(uri.split("://", 1)[1], start=start, end=start + length)
    with open(storage.arrow_fs(uri)[1], "rb") as f:
        f.seek(start)
        return f.read(length)


_TOKENIZERS: dict[str, Any] = {}


def cached_tokenizer(storage: st.Storage, uri: str):
    """One tokenizer per worker process; special-token strings inside documents stay plain text."""
    tok = _TOKENIZERS.get(uri)
    if tok is None:
        from stages.train_tokenizer.stage import load_tokenizer

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
    validation_thresholds: dict[str, float]  # per source (see thresholds_from_summary); others use the fraction
    seed: int
    batch_rows: int
    dtype: str = "uint32"  # of the token ids: the shards' dtype (uint16 halves what pack reads)
    threads: int = 1  # tokenizer threads; more than 1 runs in workers started with threads_env(threads)


def encoded_schema(dtype: pa.DataType) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("source", pa.string()), ("split", pa.string()), ("tokens", pa.large_list(dtype))])


def encode_part(storage: st.Storage, input_uri: str, out_uri: str, job: EncodeJob) -> dict[str, Any]:
    """Encode one input file; stream id, source, split, tokens (with EOS) to ``out_uri``; return counts."""
    with tokenizer_threads(job.threads):
        return _encode_part(storage, input_uri, out_uri, job)


def _encode_part(storage: st.Storage, input_uri: str, out_uri: str, job: EncodeJob) -> dict[str, Any]:
    tok = cached_tokenizer(storage, job.tokenizer_uri)
    dtype = getattr(pa, job.dtype)()
    schema = encoded_schema(dtype)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    docs = 0
    sink = writer = None
    try:
        for batch in iter_parquet_batches(storage, input_uri, job.batch_rows, columns=["id", "text", "source"]):
            texts = batch.column("text").to_pylist()
            ids = batch.column("id").to_pylist()
            encodings = tok.encode_batch_fast([t or "" for t in texts], add_special_tokens=False)
            lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
            extra = 1 + (job.bos_id is not None)
            values = np.empty(int(lengths.sum()) + extra * len(lengths), dtype=dtype.to_pandas_dtype())
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths + extra, out=offsets[1:])
            for i, e in enumerate(encodings):
                start, end = offsets[i], offsets[i + 1]
                if job.bos_id is not None:
                    values[start] = job.bos_id
                    start += 1
                values[start : end - 1] = e.ids
                values[end - 1] = job.eos_id
            del encodings
            sources = batch.column("source").to_pylist()
            split = [VALIDATION if is_validation(i, job.validation_thresholds.get(s, job.validation_fraction), job.seed) else TRAIN
                     for i, s in zip(ids, sources)]
            tokens = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
            table = pa.table({"id": batch.column("id").cast(pa.string()), "source": batch.column("source").cast(pa.string()),
                              "split": pa.array(split, pa.string()), "tokens": tokens}, schema=schema)
            if writer is None:
                fs, path = storage.arrow_fs(out_uri)
                storage.makedirs(out_uri.rsplit("/", 1)[0])
                sink = fs.open_output_stream(path)
                writer = pa.ipc.new_file(sink, schema)
            writer.write_table(table)
            for s, src, n in zip(split, sources, (lengths + extra).tolist()):
                c = counts.setdefault(s, {}).setdefault(src, {"docs": 0, "tokens": 0})
                c["docs"] += 1
                c["tokens"] += n
            docs += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
        if sink is not None:
            sink.close()
    return {"uri": out_uri if writer is not None else None, "docs": docs, "counts": counts, "bytes_in": storage.size(input_uri)}


# -- 2. pack ----------------------------------------------------------------------------------------

@dataclass
class Stream:
    tokens: np.ndarray  # uint16 or uint32 (the token dtype)
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
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(stream.tokens[:cut].astype(np_dtype, copy=False)), L),
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
    buckets: dict[str, int]  # split -> number of output buckets (shards), see num_buckets


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


_MASK64 = (1 << 64) - 1


def bucket_of(seq_ids: np.ndarray, seed: int, split: str, buckets: int) -> np.ndarray:
    """The output bucket of each sequence: a keyed hash of (seed, split, seq_id) mod ``buckets``."""
    key = int(mix64(np.array([(seed * 0x9E3779B97F4A7C15 + SPLIT_CODE[split] + 1) & _MASK64], dtype=np.uint64))[0])
    h = mix64(np.asarray(seq_ids).astype(np.uint64) ^ np.uint64(key))
    return (h % np.uint64(buckets)).astype(np.int64)


def num_buckets(expected_sequences: float, shard_sequences: int) -> int:
    """Buckets (= shards) of a split: about ``shard_sequences`` sequences each, from the expected
    sequence count (a function of the input and the config, not of the number of workers)."""
    return max(1, math.ceil(expected_sequences / shard_sequences))


def write_bucketed(storage: st.Storage, uri: str, table: pa.Table, seed: int, split: str, buckets: int) -> int:
    """Write ``table`` bucketed: one encapsulated Arrow IPC message per bucket (empty ones too),
    back to back, then the B + 1 message offsets as little-endian int64. A writer reads 16 bytes
    of the index and then exactly its bucket's bytes (an IPC file's footer would cost every reader
    O(B) bytes per file). Returns the file's size."""
    which = bucket_of(table.column("seq_id").to_numpy(), seed, split, buckets)
    order = np.argsort(which, kind="stable")  # packing order within a bucket
    counts = np.bincount(which, minlength=buckets)
    rows = table.take(pa.array(order)).combine_chunks()
    batch = rows.to_batches()[0] if rows.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
    storage.makedirs(uri.rsplit("/", 1)[0])
    offsets = np.zeros(buckets + 1, dtype="<i8")
    with storage.open(uri, "wb") as f:
        start = 0
        for b, n in enumerate(counts.tolist()):
            message = batch.slice(start, n).serialize()
            f.write(message)
            offsets[b + 1] = offsets[b] + message.size
            start += n
        f.write(offsets.tobytes())
    return int(offsets[-1]) + offsets.nbytes


def read_bucket(storage: st.Storage, uri: str, size: int, bucket: int, buckets: int, schema: pa.Schema) -> tuple[Optional[pa.RecordBatch], int]:
    """Bucket ``bucket`` of a file written by :func:`write_bucketed` (None when empty), and the
    bytes read for it. A file whose size does not fit its index is named in the error."""
    index_at = size - 8 * (buckets + 1)
    lo, hi = (int(x) for x in np.frombuffer(read_range(storage, uri, index_at + 8 * bucket, 16), dtype="<i8"))
    if not 0 <= lo <= hi <= index_at:
        raise ValueError(f"{uri}: bucket {bucket} of {buckets} points outside the file ({lo}..{hi} of {index_at} bytes): truncated or foreign")
    if hi == lo:
        return None, 16
    try:
        batch = pa.ipc.read_record_batch(pa.py_buffer(read_range(storage, uri, lo, hi - lo)), schema)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{uri}: bucket {bucket} of {buckets} is not a record batch of the packed schema: {e}") from None
    return batch, 16 + hi - lo


def _stream_to_table(stream: Stream) -> pa.Table:
    lens = np.diff(np.append(stream.seg_starts, len(stream.tokens)))
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return pa.table({"id": stream.seg_ids, "source": stream.seg_sources, "copy": pa.array(stream.seg_copies, pa.int32()),
                     "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(stream.tokens))})


def _table_to_stream(table: pa.Table) -> Stream:
    tokens = table.column("tokens").combine_chunks()
    offsets = np.asarray(tokens.offsets)
    return Stream(np.asarray(tokens.values), offsets[:-1].astype(np.int64), table.column("id").combine_chunks(),
                  table.column("source").combine_chunks(), table.column("copy").to_numpy().astype(np.int32))


def pack_part(storage: st.Storage, encoded_uri: str, part_index: int, out_prefix: str, job: PackJob) -> dict[str, Any]:
    """Pack one encoded part, per split: full sequences to a bucketed file, the tail to a tail file;
    returns the files (uri, rows, bytes) and token counts."""
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
        del sel
        lens = np.diff(np.append(stream.seg_starts, len(stream.tokens)))
        tok_per_source: dict[str, int] = {}
        for src, n in zip(stream.seg_sources.to_pylist(), lens.tolist()):
            tok_per_source[src] = tok_per_source.get(src, 0) + n
        out["tokens"][split] = tok_per_source
        table, tail = pack_stream(stream, job.seq_len, dtype, seq_id_base=part_index << 32)
        del stream
        if table.num_rows:
            uri = f"{out_prefix}-{split}.arrow"
            size = write_bucketed(storage, uri, table, job.seed, split, job.buckets[split])
            out["files"][split] = {"uri": uri, "rows": table.num_rows, "bytes": size}
        if len(tail.tokens):
            uri = f"{out_prefix}-{split}-tail.arrow"
            write_ipc(storage, uri, _stream_to_table(tail))
            out["tails"][split] = uri
    return out


def pack_tails(storage: st.Storage, tails: list[str], split: str, out_uri: str, job: PackJob, seq_id_base: int) -> dict[str, Any]:
    """Pack the parts' tails of one split together (in part order) into a bucketed file; what still
    does not fill a sequence is dropped (fewer than seq_len + 1 tokens per split)."""
    stream = Stream.concat([_table_to_stream(read_ipc(storage, u)) for u in tails])
    table, rest = pack_stream(stream, job.seq_len, getattr(pa, job.dtype)(), seq_id_base=seq_id_base)
    out: dict[str, Any] = {"file": None, "dropped": int(len(rest.tokens))}
    if table.num_rows:
        size = write_bucketed(storage, out_uri, table, job.seed, split, job.buckets[split])
        out["file"] = {"uri": out_uri, "rows": table.num_rows, "bytes": size}
    return out


def hash_seed(seed: int, part_index: int, split: str) -> list[int]:
    return [seed, part_index, SPLIT_CODE[split]]


# -- 3. shuffle within a bucket and write ------------------------------------------------------------

def bucket_permutation(n: int, seed: int, split: str, bucket: int) -> np.ndarray:
    """The seeded order of one bucket's sequences (numpy PCG64 permutation: uniform)."""
    return np.random.default_rng([seed, SPLIT_CODE[split], bucket, 0x5_4FF1E]).permutation(n)


def write_bucket(storage: st.Storage, split: str, bucket: int, packed: list[dict[str, Any]], attempt_uri: str, attempt: str,
                 job: PackJob, batch_rows: int) -> tuple[PartResult, int]:
    """Read bucket ``bucket`` of every packed file (``uri`` and ``bytes``, in part order), shuffle,
    and write the sequences as one Arrow IPC shard in record batches of ``batch_rows`` rows.
    Returns the shard's part result and the bytes read."""
    schema = sequence_schema(job.seq_len, getattr(pa, job.dtype)())
    batches, bytes_read = [], 0
    for f in packed:
        batch, n = read_bucket(storage, f["uri"], f["bytes"], bucket, job.buckets[split], schema)
        bytes_read += n
        if batch is not None:
            batches.append(batch)
    out = PartOutputs(storage, attempt_uri, attempt, part_id=f"{bucket:05d}", max_rows_per_file=None, measure_column=None,
                      formats={split: "arrow"})
    if batches:
        table = pa.Table.from_batches(batches, schema=schema)
        table = table.take(pa.array(bucket_permutation(table.num_rows, job.seed, split, bucket))).combine_chunks()
        table = pa.Table.from_batches(table.to_batches(max_chunksize=batch_rows))
        out.write(split, table.replace_schema_metadata({ROWS_PER_BATCH_KEY: str(batch_rows).encode()}))
    return out.close(rows_in=0), bytes_read


@contextlib.contextmanager
def tokenizer_threads(threads: int):
    """One thread: the tokenizer runs serially in the worker that calls it (a shared worker of the
    run; ``tokenizers`` reads TOKENIZERS_PARALLELISM at every call). More: the caller ran this in a
    worker started with ``threads_env`` (rayon sizes its pool once per process), nothing to do."""
    if threads != 1:
        yield
        return
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def threads_env(threads: int) -> dict[str, str]:
    """The environment of workers that tokenize with ``threads`` threads (more than one)."""
    return {"RAYON_NUM_THREADS": str(threads), "RAYON_RS_NUM_CPUS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
