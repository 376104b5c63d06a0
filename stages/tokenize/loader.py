"""The training data loader over the tokenize stage's Arrow shards, with memory that does not grow
with the corpus and a sample order that does not depend on the number of ranks.

**Chunks.** A chunk is one record batch of one shard. At start every rank learns the row count of
every chunk: local shards are memory-mapped and asked (free); remote shards (``s3://``) cost one
batched size request plus one ranged read of each file's footer, and then either one ranged read
of the *last* record batch's header (when the schema metadata ``lmpipe.rows_per_batch`` says how
many rows the other batches hold: a hint, checked against every batch when it is read) or one of
every batch's header (a few hundred bytes each, fetched concurrently). That is a few per-chunk
arrays (8 bytes a chunk: 1 T tokens in 1,024-row batches of 2,048 tokens is ~500 k chunks, 4 MB),
never a per-sequence one.

**Order (one per epoch, the same whatever the number of ranks).** A seeded bijection over the
chunks (a 4-round Feistel network with cycle-walking, keyed by (seed, epoch): written here rather
than numpy's shuffle because numpy does not promise its streams across versions, and a resumed run
must see the same order after an upgrade) gives the chunks' order; their concatenation is cut into
``streams`` (C) contiguous, near-equal segments, one per canonical stream (MosaicML
StreamingDataset's canonical nodes). Inside a stream, sequences are shuffled within windows of
``shuffle_window`` (K) sequences by another keyed Feistel bijection. Global position ``p`` of the
epoch is index ``p // C`` of stream ``p % C``: every C consecutive positions draw from C different
places of the corpus. The chunk order is materialised (one int64 per chunk, see above); the
sequence order never is -- a position is mapped to its (chunk, row) on demand.

Two refinements over "stream s reads segment s" keep each chunk read about once per epoch: a
chunk cut by a segment boundary is needed by two streams, so (1) odd segments are read backwards,
and the two streams reach their shared chunk at the same moment (both at the start of the epoch or
both at its end: one read, from the cache); (2) stream s reads segment ``g(s)``, s's digits
reversed in the mixed radix of C's prime factors, so that the streams of one rank hold contiguous
segments (for every power-of-two W with C = 64) and only W - 1 boundary chunks are read by two
ranks.

**Ranks.** Micro-batch ``j`` of all W ranks together covers the global positions
``[P + j*W*mb, P + (j+1)*W*mb)`` (P: where the run started in the epoch); rank ``r`` takes
``P + r, P + r + W, ...``. With W dividing C, rank r reads only streams ``s = P + r (mod W)``, so
the ranks' read sets are disjoint except for at most W - 1 chunks (see above; P is a multiple of
W unless the run resumed from another W, which only rotates which rank reads which streams). An epoch ends when the next global micro-batch no longer fits; the tail (< W*mb
sequences) is dropped for that epoch, as before.

**State** is the number of sequences of the epoch that all ranks together have consumed, the
epoch, and what the order depends on (seed, C, K, number of sequences, and a fingerprint of the
shard names and chunk sizes). It is the same on every rank, so a run checkpointed on W ranks
resumes on any W' that divides C: it continues with exactly the positions not yet consumed.

**Reading.** Local shards: memory-mapped, rows copied only into the output batch. Remote shards:
one ranged GET per chunk of exactly its bytes (the footer says where each batch starts and how long
its metadata and body are), decoded zero-copy from that buffer, into an LRU cache bounded in bytes;
a background thread prefetches the chunks of the next positions of this rank. A working set of
about 2 x (C/W) x (K/rows-per-batch + 1) chunks must fit the cache, else chunks are read again.

Bad input is one line naming the file: not Arrow IPC (truncated or foreign), no ``tokens``
column of fixed width, a width unlike the first shard's, a missing shard, a batch whose row count
differs from what the footer or the hint said; and a loader state from another run names its key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from pipeline import manifest as mf
from pipeline import storage as st
from stages.tokenize.hashing import mix64

log = logging.getLogger("lmpipe.loader")

STATE_VERSION = 2
DEFAULT_STREAMS = 64
DEFAULT_SHUFFLE_WINDOW = 1024
DEFAULT_CACHE_BYTES = 512 << 20
ROWS_PER_BATCH_KEY = b"lmpipe.rows_per_batch"
_PLAN_BATCHES = 64  # micro-batches whose positions are mapped to chunks together
_TAIL_BYTES = 16 << 10  # first read of a remote file's end: the footer of a shard of <= ~500 batches


def shard_files(storage: st.Storage, stage_dir: str, split: str = "train") -> list[str]:
    """The committed shards of one split of a tokenize stage, in manifest order."""
    manifest = mf.load_manifest(storage, stage_dir)
    if manifest is None:
        raise FileNotFoundError(f"{stage_dir}: no committed stage output (no {mf.MANIFEST})")
    return mf.dataset_files(manifest, stage_dir, split)


# -- a keyed bijection over [0, n) -------------------------------------------------------------------

_U = np.uint64


_ROUND_CONSTANTS = mix64(np.arange(1, 9, dtype=np.uint64) * _U(0x9E3779B97F4A7C15))


def _key(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little")


def feistel(x: np.ndarray, n: Any, key: Any, rounds: int = 4) -> np.ndarray:  # rounds <= 8
    """A keyed permutation of ``[0, n)`` applied to ``x``: a balanced Feistel network over the
    smallest even number of bits covering ``n`` (at most 4n values), cycle-walking values that
    land outside ``[0, n)`` back in. ``n`` and ``key`` may be arrays (one permutation per element)."""
    x = np.asarray(x, dtype=np.uint64).reshape(-1)
    n = np.broadcast_to(np.asarray(n, dtype=np.uint64), x.shape).copy()
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), x.shape).copy()
    bits = np.ceil(np.log2(np.maximum(n, 1).astype(np.float64))).astype(np.uint64)
    bits += (np.left_shift(_U(1), bits) < n).astype(np.uint64)  # float log2 rounding
    bits = np.maximum(bits + (bits & _U(1)), _U(2))
    half = bits >> _U(1)
    mask = np.left_shift(_U(1), half) - _U(1)
    round_keys = [mix64(key ^ _ROUND_CONSTANTS[r]) for r in range(rounds)]

    def once(v: np.ndarray, sel: np.ndarray) -> np.ndarray:
        h, m = half[sel], mask[sel]
        left, right = v >> h, v & m
        for rk in round_keys:
            left, right = right, left ^ (mix64(right ^ rk[sel]) & m)
        return (left << h) | right

    everything = np.arange(len(x))
    y = once(x, everything)
    out = y >= n
    while out.any():  # expected < 4 rounds of walking: the domain is < 4n
        idx = np.nonzero(out)[0]
        y[idx] = once(y[idx], idx)
        out[idx] = y[idx] >= n[idx]
    return y.astype(np.int64)


def segment_of_stream(streams: int) -> np.ndarray:
    """Which segment of the chunk-ordered corpus each stream reads: the stream number's digits
    reversed in the mixed radix of ``streams``'s prime factors, smallest first. The streams of one
    rank (``s = r mod W``) then hold contiguous segments whenever W is a product of the smallest
    factors (every power of two for ``streams = 64``), so only W - 1 segment boundaries lie
    between two ranks."""
    factors, n, f = [], streams, 2
    while n > 1:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    out = np.zeros(streams, dtype=np.int64)
    for stream in range(streams):
        rest, weight, g = stream, streams, 0
        for f in factors:
            weight //= f
            g += (rest % f) * weight
            rest //= f
        out[stream] = g
    return out


def stream_segments(num_sequences: int, streams: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per stream: its length (streams ``s < N mod C`` hold one more, so that global position
    ``p`` is valid exactly when ``p < N``), where its segment starts, and whether it reads it
    backwards. Odd segments are read backwards, so the two streams that share a boundary chunk read
    it at the same time (both at the start of the epoch, or both at the end): one read serves both
    where they are on the same rank."""
    q, r = divmod(num_sequences, streams)
    length = q + (np.arange(streams) < r)
    segment = segment_of_stream(streams)
    by_segment = np.argsort(segment)
    first = np.zeros(streams, dtype=np.int64)
    first[by_segment] = np.concatenate([[0], np.cumsum(length[by_segment])[:-1]])
    return length.astype(np.int64), first, segment % 2 == 1


# -- shards and their chunks -----------------------------------------------------------------------

class ShardError(ValueError):
    """A shard the loader cannot use: the message names the file."""


def _u32(b: bytes, pos: int) -> int:
    return struct.unpack_from("<I", b, pos)[0]


def _field(b: bytes, table: int, index: int) -> Optional[int]:
    """Absolute position of field ``index`` of the flatbuffer table at ``table`` (None: absent)."""
    vtable = table - struct.unpack_from("<i", b, table)[0]
    vt_len = struct.unpack_from("<H", b, vtable)[0]
    slot = 4 + 2 * index
    if slot >= vt_len:
        return None
    off = struct.unpack_from("<H", b, vtable + slot)[0]
    return table + off if off else None


def _footer_blocks(footer: bytes) -> list[tuple[int, int, int]]:
    """(offset, metadata length, body length) of every record batch, from an Arrow IPC file footer
    (flatbuffer ``Footer``: field 3 is ``recordBatches``, a vector of 24-byte ``Block`` structs)."""
    root = _u32(footer, 0)
    pos = _field(footer, root, 3)
    if pos is None:
        return []
    vec = pos + _u32(footer, pos)
    return [struct.unpack_from("<qi4xq", footer, vec + 4 + 24 * i) for i in range(_u32(footer, vec))]


def _message_rows(meta: bytes) -> int:
    """The row count in an encapsulated IPC message's metadata (``Message.header`` -> ``RecordBatch.length``)."""
    start = 8 if meta[:4] == b"\xff\xff\xff\xff" else 4
    fb = meta[start:]
    root = _u32(fb, 0)
    header = _field(fb, root, 2)
    if header is None:
        return 0
    batch = header + _u32(fb, header)
    length = _field(fb, batch, 0)
    return struct.unpack_from("<q", fb, length)[0] if length is not None else 0


def _tokens_view(batch: pa.RecordBatch, uri: str, index: int) -> np.ndarray:
    col = batch.column("tokens")
    width = col.type.list_size
    flat = col.values.slice(col.offset * width, len(col) * width)
    if flat.null_count:
        raise ShardError(f"{uri}: record batch {index} has null tokens")
    return flat.to_numpy(zero_copy_only=True).reshape(len(col), width)


def _check_schema(schema: pa.Schema, uri: str) -> int:
    """The shard's sequence width (seq_len + 1)."""
    idx = schema.get_field_index("tokens")
    if idx < 0:
        raise ShardError(f"{uri}: not a token shard (no 'tokens' column; columns: {schema.names})")
    typ = schema.field(idx).type
    if not pa.types.is_fixed_size_list(typ) or not pa.types.is_integer(typ.value_type):
        raise ShardError(f"{uri}: 'tokens' is {typ}, expected fixed_size_list<integer> (one sequence per row)")
    return typ.list_size


@dataclass
class _Shard:
    uri: str
    width: int
    rows: list[int]  # per record batch
    hinted: bool = False  # rows come (partly) from the rows_per_batch hint: check them when read
    reader: Any = None  # local: the memory-mapped file reader
    blocks: Optional[list[tuple[int, int, int]]] = None  # remote: byte ranges of the batches
    schema: Optional[pa.Schema] = None


def _open_local(uri: str) -> _Shard:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    try:
        reader = pa.ipc.open_file(pa.memory_map(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: shard listed but missing") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{uri}: not an Arrow IPC file (truncated or foreign): {e}") from None
    width = _check_schema(reader.schema, uri)
    rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]  # zero-copy: headers only
    return _Shard(uri, width, rows, reader=reader, schema=reader.schema)


def _open_remote(storage: st.Storage, uris: list[str]) -> tuple[list[_Shard], int]:
    """All remote shards' footers (and batch row counts), with few batched requests; returns the
    shards and the bytes read."""
    fs = storage.fs(uris[0])
    paths = [u.split("://", 1)[1] for u in uris]
    try:
        sizes = fs.sizes(paths)
    except FileNotFoundError:
        missing = next(u for u, p in zip(uris, paths) if not fs.exists(p))
        raise FileNotFoundError(f"{missing}: shard listed but missing") from None
    starts = [max(0, s - _TAIL_BYTES) for s in sizes]
    tails = fs.cat_ranges(paths, starts, sizes)
    fetched = sum(len(t) for t in tails)
    shards, header_reads = [], []
    for uri, size, start, tail in zip(uris, sizes, starts, tails):
        if isinstance(tail, Exception):
            raise tail
        if size < 18 or tail[-6:] != b"ARROW1":
            raise ShardError(f"{uri}: not an Arrow IPC file (truncated or foreign: no ARROW1 footer)")
        footer_len = struct.unpack_from("<i", tail, len(tail) - 10)[0]
        if footer_len <= 0 or footer_len + 10 > size - 8:
            raise ShardError(f"{uri}: not an Arrow IPC file (bad footer length {footer_len})")
        if footer_len + 10 > len(tail):
            tail = fs.cat_file(paths[len(shards)], start=size - footer_len - 10, end=size)
            fetched += len(tail)
            start = size - len(tail)
        footer = tail[len(tail) - 10 - footer_len: len(tail) - 10]
        try:  # the schema through Arrow's own reader, from the footer bytes already here
            schema = pa.ipc.open_file(pa.BufferReader(b"ARROW1\0\0" + footer + tail[-10:])).schema
            blocks = _footer_blocks(footer)
        except (pa.ArrowInvalid, struct.error, IndexError) as e:
            raise ShardError(f"{uri}: not an Arrow IPC file (unreadable footer: {e})") from None
        if any(off + meta + body > size - footer_len - 10 for off, meta, body in blocks):
            raise ShardError(f"{uri}: truncated (a record batch lies beyond the data)")
        width = _check_schema(schema, uri)
        hint = (schema.metadata or {}).get(ROWS_PER_BATCH_KEY)
        shard = _Shard(uri, width, [0] * len(blocks), blocks=blocks, schema=schema)
        if hint is not None and blocks:
            shard.rows = [int(hint)] * len(blocks)
            shard.hinted = True
            need = [len(blocks) - 1]
        else:
            need = list(range(len(blocks)))
        header_reads += [(len(shards), i) for i in need]
        shards.append(shard)
    if header_reads:
        heads = fs.cat_ranges([paths[s] for s, _ in header_reads],
                              [shards[s].blocks[i][0] for s, i in header_reads],
                              [shards[s].blocks[i][0] + shards[s].blocks[i][1] for s, i in header_reads])
        for (s, i), meta in zip(header_reads, heads):
            if isinstance(meta, Exception):
                raise meta
            fetched += len(meta)
            try:
                shards[s].rows[i] = _message_rows(meta)
            except (struct.error, IndexError) as e:
                raise ShardError(f"{shards[s].uri}: record batch {i} has an unreadable header ({e})") from None
    return shards, fetched


class _ChunkCache:
    """Decoded remote chunks, least recently used first out, within ``budget`` bytes; ``prefetch``
    loads chunks on a background thread while what is cached and in flight fits the budget."""

    def __init__(self, budget: int, load, threads: int):
        self.budget, self._load = budget, load
        self._lock = threading.Lock()
        self._data: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[int, Future] = {}
        self._pending: dict[int, int] = {}  # prefetched (or being prefetched), not yet asked for: chunk -> bytes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lmpipe-prefetch") if threads else None
        self.hits = self.misses = self.loads = 0
        self.peak_bytes = 0

    def _insert(self, chunk: int, arr: np.ndarray) -> None:
        if chunk in self._data:
            return
        self._data[chunk] = arr
        self._bytes += arr.nbytes
        while self._bytes > self.budget and len(self._data) > 1:
            evicted, old = self._data.popitem(last=False)
            self._bytes -= old.nbytes
            self._pending.pop(evicted, None)
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def _fetch(self, chunk: int) -> np.ndarray:
        try:
            arr = self._load(chunk)
            with self._lock:
                self.loads += 1
                self._insert(chunk, arr)
            return arr
        finally:
            with self._lock:
                self._inflight.pop(chunk, None)

    def get(self, chunk: int) -> np.ndarray:
        with self._lock:
            self._pending.pop(chunk, None)
            arr = self._data.get(chunk)
            if arr is not None:
                self._data.move_to_end(chunk)
                self.hits += 1
                return arr
            future = self._inflight.get(chunk)
            self.misses += future is None
        if future is not None:
            return future.result()
        return self._fetch(chunk)

    def prefetch(self, chunks: list[int], chunk_bytes) -> int:
        """Queue ``chunks`` in order while the prefetched-but-unused ones fit half the budget (the
        other half holds the chunks in use); returns how many of ``chunks`` are cached or queued."""
        if self._pool is None:
            return len(chunks)
        with self._lock:
            ahead = sum(self._pending.values())
            for k, c in enumerate(chunks):
                if c in self._data or c in self._inflight:
                    continue
                size = chunk_bytes(c)
                if ahead + size > self.budget // 2:
                    return k
                ahead += size
                self._pending[c] = size
                self._inflight[c] = self._pool.submit(self._fetch, c)
        return len(chunks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


# -- the loader -------------------------------------------------------------------------------------

class TokenShardLoader:
    """Iterate ``(inputs, targets)`` LongTensor batches of shape ``[batch_size, seq_len]``.

    ``streams``: canonical streams C (the world size must divide it, now and on resume);
    ``shuffle_window``: sequences shuffled together inside a stream; ``cache_bytes``: the bound on
    decoded remote chunks held; ``prefetch_threads``: 0 reads on demand only. ``shuffle=False``
    reads the corpus in order (position p is sequence p), for evaluation and debugging."""

    resumes_on_any_world_size = True  # the trainer may restore its state on another number of ranks

    def __init__(self, files: list[str], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 storage: Optional[st.Storage] = None, shuffle: bool = True, loop: bool = True,
                 streams: int = DEFAULT_STREAMS, shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, prefetch_threads: int = 1):
        if not files:
            raise ValueError("TokenShardLoader needs at least one shard file")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or streams < 1 or shuffle_window < 1:
            raise ValueError("batch_size, streams and shuffle_window must be >= 1")
        if shuffle and streams % world_size:
            raise ValueError(f"world_size {world_size} does not divide the loader's streams={streams}: "
                             f"use a number of ranks that divides {streams}, or start a run with another streams")
        self.files = list(files)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle, self.loop = shuffle, loop
        self.streams, self.shuffle_window = streams, shuffle_window
        self.storage = storage or st.Storage()
        self.bytes_fetched = 0  # remote bytes read (footers, headers, chunks)
        self._count_lock = threading.Lock()

        remote = [st.is_remote(f) for f in self.files]
        if any(remote) and not all(remote):
            raise ValueError("TokenShardLoader: shards must be all local or all remote")
        if all(remote):
            self.shards, self.bytes_fetched = _open_remote(self.storage, self.files)
        else:
            self.shards = [_open_local(f) for f in self.files]
        self.width = self.shards[0].width
        for shard in self.shards:
            if shard.width != self.width:
                raise ShardError(f"{shard.uri}: sequences of {shard.width} tokens, but {self.shards[0].uri} has {self.width}")
        self.seq_len = self.width - 1
        self.chunk_shard = np.concatenate([np.full(len(s.rows), k, dtype=np.int32) for k, s in enumerate(self.shards)])
        self.chunk_batch = np.concatenate([np.arange(len(s.rows), dtype=np.int32) for s in self.shards])
        self.chunk_rows = np.concatenate([np.asarray(s.rows, dtype=np.int64) for s in self.shards])
        self.chunk_start = np.concatenate([[0], np.cumsum(self.chunk_rows)]).astype(np.int64)  # original order
        self.num_chunks = len(self.chunk_rows)
        self.num_sequences = int(self.chunk_start[-1])
        if self.num_sequences // (world_size * batch_size) == 0:
            raise ValueError(f"{self.num_sequences} sequences are too few for {world_size} rank(s) x batch_size {batch_size}")
        self.fingerprint = hashlib.sha256(json.dumps(
            [[f.rsplit("/", 1)[-1], s.rows] for f, s in zip(self.files, self.shards)]).encode()).hexdigest()[:16]
        self._stream_len, self._stream_first, self._stream_backward = stream_segments(self.num_sequences, streams)
        self._remote = all(remote)
        self._views: OrderedDict[int, np.ndarray] = OrderedDict()
        self._plan: Optional[tuple] = None
        self._cache = _ChunkCache(cache_bytes, self._read_chunk, prefetch_threads) if self._remote else None
        if self._cache is not None and shuffle:
            rows = self.num_sequences / self.num_chunks
            working_set = 2 * (streams // world_size) * (shuffle_window / rows + 1) * rows * self.width * 2
            if working_set > cache_bytes:
                log.warning("loader: this rank's working set (~%d MiB: 2 x %d streams x a shuffle window's chunks) exceeds "
                            "cache_bytes (%d MiB); chunks will be read more than once", working_set / 2**20,
                            streams // world_size, cache_bytes / 2**20)
        self.epoch = 0
        self.position = 0  # sequences of this epoch consumed by all ranks together
        self._layout_epoch = -1
        self._prefetched_until = self._prefetch_next_look = 0

    def __len__(self) -> int:
        """Micro-batches per epoch on each rank (from the start of an epoch)."""
        return self.num_sequences // (self.world_size * self.batch_size)

    # -- order ----------------------------------------------------------------------------------------
    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The chunks' order in ``epoch`` and where each starts in their concatenation."""
        if self._layout_epoch != epoch:
            if self.shuffle:
                self._perm = feistel(np.arange(self.num_chunks), self.num_chunks, _key("chunks", self.seed, epoch))
            else:
                self._perm = np.arange(self.num_chunks)
            self._starts = np.concatenate([[0], np.cumsum(self.chunk_rows[self._perm])]).astype(np.int64)
            self._layout_epoch = epoch
        return self._perm, self._starts

    def locate(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(chunk, row in chunk) of the sequences at global ``positions`` of ``epoch``."""
        perm, starts = self._layout(epoch)
        p = np.asarray(positions, dtype=np.int64)
        if self.shuffle:
            c, k = self.streams, self.shuffle_window
            s, i = p % c, p // c
            length, first, backward = self._stream_len[s], self._stream_first[s], self._stream_backward[s]
            w, j = i // k, i % k
            span = np.minimum(k, length - w * k)
            keys = mix64(_U(_key("window", self.seed, epoch)) ^ mix64(s.astype(np.uint64) * _U(0x100000001B3) + w.astype(np.uint64)))
            within = w * k + feistel(j, span, keys)
            offset = first + np.where(backward, length - 1 - within, within)
        else:
            offset = p
        at = np.searchsorted(starts, offset, side="right") - 1
        return perm[at], offset - starts[at]

    def sequence_ids(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Corpus-order sequence numbers at global ``positions`` of ``epoch`` (for tests and lineage)."""
        chunk, row = self.locate(epoch, positions)
        return self.chunk_start[chunk] + row

    def rank_positions(self, start: int) -> np.ndarray:
        """This rank's positions in the global micro-batch that starts at ``start``."""
        return start + self.rank + self.world_size * np.arange(self.batch_size, dtype=np.int64)

    # -- reading --------------------------------------------------------------------------------------
    def _read_chunk(self, chunk: int) -> np.ndarray:
        shard = self.shards[self.chunk_shard[chunk]]
        index = int(self.chunk_batch[chunk])
        if shard.reader is not None:
            batch = shard.reader.get_batch(index)
        else:
            offset, meta, body = shard.blocks[index]
            data = self.storage.fs(shard.uri).cat_file(shard.uri.split("://", 1)[1], start=offset, end=offset + meta + body)
            with self._count_lock:
                self.bytes_fetched += len(data)
            if len(data) != meta + body:
                raise ShardError(f"{shard.uri}: truncated (record batch {index} is {len(data)} of {meta + body} bytes)")
            try:
                batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data)), shard.schema)
            except (pa.ArrowInvalid, OSError) as e:
                raise ShardError(f"{shard.uri}: record batch {index} is unreadable: {e}") from None
        if batch.num_rows != self.chunk_rows[chunk]:
            said = f"its schema metadata {ROWS_PER_BATCH_KEY.decode()}" if shard.hinted else "its header"
            raise ShardError(f"{shard.uri}: record batch {index} has {batch.num_rows} rows, {said} gave {self.chunk_rows[chunk]}")
        return _tokens_view(batch, shard.uri, index)

    def _chunk_bytes(self, chunk: int) -> int:
        return int(self.chunk_rows[chunk]) * self.width * 8  # an upper bound (int64 tokens)

    def chunk_tokens(self, chunk: int) -> np.ndarray:
        """The ``[rows, seq_len + 1]`` tokens of one chunk (a view: memory-mapped or cached)."""
        if self._cache is not None:
            return self._cache.get(chunk)
        view = self._views.get(chunk)  # local: views of the mapped file cost no memory, only their making
        if view is None:
            view = self._views[chunk] = self._read_chunk(chunk)
            if len(self._views) > 4096:
                self._views.popitem(last=False)
        return view

    def _prefetch(self, start: int) -> None:
        """Queue the chunks of this rank's next positions: up to a shuffle window ahead in every
        stream, as far as the cache's budget allows. Looks again once the run has used a quarter
        of what was queued (each look maps its positions: amortised, not per batch)."""
        if self._cache is None or start < self._prefetch_next_look:
            return
        horizon = min(self.num_sequences, self.streams * self.shuffle_window)
        first = max(start, self._prefetched_until)
        last = min(self.num_sequences, start + horizon)
        if last > first:
            first += (start + self.rank - first) % self.world_size  # this rank's first position >= first
            positions = np.arange(first, last, self.world_size, dtype=np.int64)
            chunks, _ = self.locate(self.epoch, positions)
            uniq, at = np.unique(chunks, return_index=True)
            order = np.argsort(at)
            queued = self._cache.prefetch([int(c) for c in uniq[order]], self._chunk_bytes)
            self._prefetched_until = last if queued == len(order) else int(positions[at[order[queued]]])
        self._prefetch_next_look = start + max(1, (self._prefetched_until - start) // 4)

    def read(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The token rows (``[len(positions), seq_len + 1]``, int64) at global ``positions`` of ``epoch``."""
        return self._gather(*self.locate(epoch, positions))

    def _gather(self, chunks: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(chunks), self.width), dtype=np.int64)
        order = np.argsort(chunks, kind="stable")
        cuts = np.flatnonzero(np.diff(chunks[order])) + 1
        for sel in np.split(order, cuts):
            tokens = self.chunk_tokens(int(chunks[sel[0]]))
            out[sel] = tokens[rows[sel]] if len(sel) > 1 else tokens[int(rows[sel[0]])]
        return out

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        import torch

        step = self.world_size * self.batch_size
        while True:
            if self.position + step > self.num_sequences:
                if not self.loop:
                    return
                self.epoch += 1
                self.position = 0
                self._prefetched_until = self._prefetch_next_look = 0
            start = self.position
            self._prefetch(start)
            tokens = torch.from_numpy(self._gather(*self._planned(start)))
            self.position = start + step
            yield tokens[:, :-1], tokens[:, 1:]

    def _planned(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk, row) of this rank's micro-batch at ``start``, mapped with the next ones (up to
        ``_PLAN_BATCHES``) in one vectorised call: the per-call cost of the mapping is paid once."""
        step, mb = self.world_size * self.batch_size, self.batch_size
        plan = self._plan
        if plan is None or plan[0] != self.epoch or not (plan[1] <= start < plan[2]) or (start - plan[1]) % step:
            count = max(1, min(_PLAN_BATCHES, (self.num_sequences - start) // step))
            positions = (start + self.rank + self.world_size * np.arange(mb, dtype=np.int64))[None, :] + step * np.arange(count)[:, None]
            plan = self._plan = (self.epoch, start, start + count * step, *self.locate(self.epoch, positions.reshape(-1)))
        at = (start - plan[1]) // step * mb
        return plan[3][at: at + mb], plan[4][at: at + mb]

    def stats(self) -> dict[str, int]:
        cache = self._cache
        return {"bytes_fetched": self.bytes_fetched, "chunks_fetched": cache.loads if cache else 0,
                "cache_hits": cache.hits if cache else 0,
                "cache_misses": cache.misses if cache else 0, "cache_peak_bytes": cache.peak_bytes if cache else 0}

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    # -- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "streams": self.streams, "shuffle_window": self.shuffle_window, "num_sequences": self.num_sequences,
                "shuffle": self.shuffle, "fingerprint": self.fingerprint,
                "world_size": self.world_size, "batch_size": self.batch_size}  # the last two: for the record only

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}: it was saved by an "
                             "older loader whose order this one does not reproduce; start the run afresh")
        for key in ("seed", "streams", "shuffle_window", "num_sequences", "shuffle", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"loader state key {key!r} is {state.get(key)!r}, this loader has {getattr(self, key)!r}: "
                                 "the state comes from another run or another corpus")
        position = int(state["position"])
        if not 0 <= position <= self.num_sequences:
            raise ValueError(f"loader state key 'position' is {position}, outside this corpus's {self.num_sequences} sequences")
        self.epoch = int(state["epoch"])
        self.position = position
        self._prefetched_until = self._prefetch_next_look = 0
