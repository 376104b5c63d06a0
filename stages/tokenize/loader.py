"""The training data loader over the tokenize stage's Arrow shards.

* Zero-copy: local shards are memory-mapped and the ``tokens`` column is viewed as a
  ``[rows, seq_len + 1]`` numpy array without copying; remote shards (``s3://``) are read on first
  use through the storage's Arrow filesystem and kept as Arrow buffers. Only a batch's rows are
  ever copied (into the output tensor).
* Sharded by rank: each epoch is one seeded permutation of all sequences (identical on every
  rank); rank ``r`` of ``w`` takes positions ``r, r + w, r + 2w, ...`` of it, truncated so that
  every rank gets the same number of full batches. Ranks never share a sequence within an epoch.
* Exact resume: the state is (epoch, batch index in the epoch) plus what it depends on (seed,
  world size, rank, number of sequences); restoring it yields exactly the batches that an
  uninterrupted loader would have yielded next.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from pipeline import manifest as mf
from pipeline import storage as st

STATE_VERSION = 1


def shard_files(storage: st.Storage, stage_dir: str, split: str = "train") -> list[str]:
    """The committed shards of one split of a tokenize stage, in manifest order."""
    manifest = mf.load_manifest(storage, stage_dir)
    if manifest is None:
        raise FileNotFoundError(f"{stage_dir}: no committed stage output (no {mf.MANIFEST})")
    return mf.dataset_files(manifest, stage_dir, split)


class _Shard:
    """One Arrow IPC shard: its row count, and its tokens as a 2-D numpy view (loaded lazily)."""

    def __init__(self, uri: str, storage: st.Storage):
        self.uri = uri
        self.storage = storage
        self._tokens: Optional[np.ndarray] = None
        if st.is_remote(uri):
            import pyarrow.dataset as pads

            fs, path = storage.arrow_fs(uri)
            self.rows = pads.dataset(path, format="ipc", filesystem=fs).count_rows()  # footer + batch headers only
        else:
            self._open()
            self.rows = len(self._tokens)

    def _open(self) -> None:
        if st.is_remote(self.uri):
            fs, path = self.storage.arrow_fs(self.uri)
            with fs.open_input_file(path) as f:
                table = pa.ipc.open_file(f).read_all()
        else:
            table = pa.ipc.open_file(pa.memory_map(self.uri)).read_all()
        col = table.column("tokens")
        arrays = []
        for chunk in col.chunks:
            width = chunk.type.list_size
            flat = chunk.values.slice(chunk.offset * width, len(chunk) * width)
            arrays.append(flat.to_numpy(zero_copy_only=True).reshape(len(chunk), width))
        self._tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        self._table = table  # keeps the mapped buffers alive

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._open()
        return self._tokens


class TokenShardLoader:
    """Iterate ``(inputs, targets)`` LongTensor batches of shape ``[batch_size, seq_len]``."""

    def __init__(self, files: list[str], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 storage: Optional[st.Storage] = None, shuffle: bool = True, loop: bool = True):
        if not files:
            raise ValueError("TokenShardLoader needs at least one shard file")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.files = list(files)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.loop = loop
        self.storage = storage or st.Storage()
        self.shards = [_Shard(f, self.storage) for f in self.files]
        self.row_starts = np.concatenate([[0], np.cumsum([s.rows for s in self.shards])]).astype(np.int64)
        self.num_sequences = int(self.row_starts[-1])
        self.per_rank = self.num_sequences // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_sequences} sequences are too few for {world_size} rank(s) x batch_size {batch_size}")
        self.seq_len = (self.shards[0].tokens.shape[1] if not st.is_remote(self.files[0]) else self._width_remote()) - 1
        self.epoch = 0
        self.position = 0  # next batch within the epoch
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    def _width_remote(self) -> int:
        fs, path = self.storage.arrow_fs(self.files[0])
        with fs.open_input_file(path) as f:
            return pa.ipc.open_file(f).schema.field("tokens").type.list_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- order --------------------------------------------------------------------------------------
    def _rank_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            else:
                perm = np.arange(self.num_sequences)
            self._order = perm[: self.per_rank * self.world_size][self.rank :: self.world_size]
            self._order_epoch = epoch
        return self._order

    def batch_rows(self, epoch: int, index: int) -> np.ndarray:
        """Global sequence numbers of batch ``index`` of ``epoch`` on this rank."""
        order = self._rank_order(epoch)
        return order[index * self.batch_size : (index + 1) * self.batch_size]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The token rows (``[len(rows), seq_len + 1]``) at global sequence numbers ``rows``."""
        shard_of = np.searchsorted(self.row_starts, rows, side="right") - 1
        out = np.empty((len(rows), self.seq_len + 1), dtype=np.int64)
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            out[sel] = self.shards[s].tokens[rows[sel] - self.row_starts[s]]
        return out

    # -- iteration ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        import torch

        while True:
            if self.position >= self.batches_per_epoch:
                if not self.loop:
                    return
                self.epoch += 1
                self.position = 0
            rows = self.batch_rows(self.epoch, self.position)
            self.position += 1
            tokens = torch.from_numpy(self.read(rows))
            yield tokens[:, :-1], tokens[:, 1:]

    # -- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "num_sequences": self.num_sequences, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "world_size", "batch_size", "num_sequences", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state[key]!r}, this loader has {getattr(self, key)!r}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
