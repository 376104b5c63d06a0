"""Decoded remote chunks (record batches of token shards) for the training loader: an LRU cache
bounded in bytes, with a background thread that prefetches the chunks the loader will ask for next."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np


class ChunkCache:
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
