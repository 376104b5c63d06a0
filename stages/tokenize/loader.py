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
import threading
from collections import OrderedDict
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from pipeline import manifest as mf
from pipeline import storage as st
from stages.tokenize.chunk_cache import ChunkCache
from stages.tokenize.hashing import mix64
from stages.tokenize.order import _U, feistel, order_key, stream_segments
from stages.tokenize.shard_index import ShardError, open_local_shard, open_remote_shards, tokens_view
from stages.tokenize.shards import ROWS_PER_BATCH_KEY

log = logging.getLogger("lmpipe.loader")

STATE_VERSION = 2
DEFAULT_STREAMS = 64
DEFAULT_SHUFFLE_WINDOW = 1024
DEFAULT_CACHE_BYTES = 512 << 20
_PLAN_BATCHES = 64  # micro-batches whose positions are mapped to chunks together


def shard_files(storage: st.Storage, stage_dir: str, split: str = "train") -> list[str]:
    """The committed shards of one split of a tokenize stage, in manifest order."""
    manifest = mf.load_committed(storage, stage_dir)
    if manifest is None:
        raise FileNotFoundError(f"{stage_dir}: no committed stage output (no {mf.MANIFEST})")
    return mf.dataset_files(manifest, stage_dir, split)


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
            self.shards, self.bytes_fetched = open_remote_shards(self.storage, self.files)
        else:
            self.shards = [open_local_shard(f) for f in self.files]
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
        self._cache = ChunkCache(cache_bytes, self._read_chunk, prefetch_threads) if self._remote else None
        if self._cache is not None and shuffle:
            rows = self.num_sequences / self.num_chunks
            token_bytes = max(shard.token_bytes for shard in self.shards)
            working_set = 2 * (streams // world_size) * (shuffle_window / rows + 1) * rows * self.width * token_bytes
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
                self._perm = feistel(np.arange(self.num_chunks), self.num_chunks, order_key("chunks", self.seed, epoch))
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
            keys = mix64(_U(order_key("window", self.seed, epoch)) ^ mix64(s.astype(np.uint64) * _U(0x100000001B3) + w.astype(np.uint64)))
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

    def micro_batch_start(self, index: int) -> tuple[int, int]:
        """(epoch, first global position) of global micro-batch ``index`` of a run that started at
        the beginning of the first epoch: an epoch holds ``len(self)`` micro-batches of all ranks and
        drops its tail, as :meth:`__iter__` does (``lmpipe trace`` maps a training step with it)."""
        per_epoch = len(self)
        return index // per_epoch, (index % per_epoch) * self.world_size * self.batch_size

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
        return tokens_view(batch, shard.uri, index)

    def chunk_bytes(self, chunk: int) -> int:
        """What the chunk will hold in the cache: its rows in the shard's own token dtype (the
        cache keeps zero-copy views; counting int64 halved (uint32) or quartered (uint16) how far
        ahead the prefetch could read)."""
        return int(self.chunk_rows[chunk]) * self.width * self.shards[self.chunk_shard[chunk]].token_bytes

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
            queued = self._cache.prefetch([int(c) for c in uniq[order]], self.chunk_bytes)
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
