"""``lmpipe trace``, the training side: an optimizer step (and rank, and position) to the token
shard rows it read, and back from shard rows to the steps that read them.

The order is the trainer's own: the loader a rank builds (:func:`stages.train.steps.train_loader`,
the launcher's), the micro-batches of a step (:func:`stages.train.steps.step_micro_batches` with
the trainer's accumulation) and where a micro-batch starts in its epoch
(:meth:`TokenShardLoader.micro_batch_start`). It assumes the run trained from step 0 on
``cluster.num_workers`` workers, as the stage does unless ``checkpoint.resume_from`` is set
(within an epoch the order does not depend on the world size; at an epoch's end the dropped tail
does). Nothing here imports torch, and no stage imports this module, so editing it recomputes
nothing.

The pipeline side (:mod:`pipeline.trace`) finds the outputs, the documents and their history; it
reaches this module through the registry, and hands it ``lookup`` (its index of a column of a
committed output) so that one cache serves both.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from pipeline import manifest as mf
from pipeline import storage as st
from pipeline.contracts import SequenceSegment, TraceError, TracedSequence
from stages.train.config import TrainStageConfig
from stages.train.steps import accumulation_steps, step_micro_batches, train_loader

SEQUENCE_COLUMNS = ["source", "doc_ids", "doc_offsets", "doc_copies", "seq_id"]
SPLITS = ("train", "validation")

Lookup = Callable[[str, dict, str, str, list[str]], dict[str, list[tuple[str, int]]]]


class StepOrder:
    """The training order of one train stage over one tokenize output."""

    def __init__(self, config: TrainStageConfig, seed: int, seq_len: int, files: list[str], storage: st.Storage):
        loop = config.loop
        self.steps, self.world = loop.steps, config.cluster.num_workers
        self.micro = loop.micro_batch_size
        self.accumulation = accumulation_steps(loop, seq_len, self.world)
        self.loader = train_loader(loop, files, 0, self.world, seed, storage, prefetch_threads=0)
        self.files = files
        rows = [sum(s.rows) for s in self.loader.shards]
        self.shard_start = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)  # corpus sequence number of each shard's row 0

    @property
    def per_step(self) -> int:
        """Sequences a rank reads per optimizer step."""
        return self.accumulation * self.micro

    def check(self, step: int, rank: Optional[int], position: Optional[int]) -> None:
        if not 1 <= step <= self.steps:
            raise TraceError(f"step {step} is not a step of this training run (steps 1 to {self.steps})")
        if rank is not None and not 0 <= rank < self.world:
            raise TraceError(f"rank {rank} is not a rank of this training run (ranks 0 to {self.world - 1}: cluster.num_workers {self.world})")
        if position is not None and not 0 <= position < self.per_step:
            raise TraceError(f"position {position} is not a position of a step (0 to {self.per_step - 1}: "
                             f"{self.accumulation} micro-batch(es) of {self.micro} sequences per rank)")

    def at_step(self, step: int, rank: Optional[int] = None, position: Optional[int] = None) -> list[dict[str, int]]:
        """Where each sequence of the step comes from: rank, position, micro-batch, epoch, global
        position and corpus sequence number (rank-major, then position)."""
        self.check(step, rank, position)
        out = []
        for micro, index in enumerate(step_micro_batches(step, self.accumulation)):
            epoch, start = self.loader.micro_batch_start(index)
            for r in range(self.world) if rank is None else [rank]:
                positions = start + r + self.world * np.arange(self.micro, dtype=np.int64)  # the loader's rank_positions
                sequences = self.loader.sequence_ids(epoch, positions)
                for i, (p, s) in enumerate(zip(positions.tolist(), sequences.tolist())):
                    place = {"rank": r, "position": micro * self.micro + i, "micro_batch": micro, "epoch": epoch,
                             "global_position": p, "sequence": s, "step": step}
                    if position is None or place["position"] == position:
                        out.append(place)
        return sorted(out, key=lambda p: (p["rank"], p["position"]))

    def reads_of(self, sequences: list[int]) -> dict[int, list[dict[str, int]]]:
        """Every time training read each corpus sequence: step, rank, position, micro-batch, epoch,
        global position (none for a sequence read after the last step or dropped with an epoch's tail)."""
        wanted = np.asarray(sorted(set(sequences)), dtype=np.int64)
        out: dict[int, list[dict[str, int]]] = {int(s): [] for s in wanted}
        total = self.steps * self.accumulation  # global micro-batches the run reads
        per_epoch = len(self.loader)
        batch = self.world * self.micro
        for epoch in range(-(-total // per_epoch)):
            used = min(per_epoch, total - epoch * per_epoch) * batch
            ids = self.loader.sequence_ids(epoch, np.arange(used, dtype=np.int64))
            hit = np.nonzero(np.isin(ids, wanted))[0]
            for p in hit.tolist():
                index = epoch * per_epoch + p // batch
                within = p % batch
                micro = index % self.accumulation
                out[int(ids[p])].append({"step": index // self.accumulation + 1, "rank": within % self.world,
                                         "position": micro * self.micro + within // self.world, "micro_batch": micro,
                                         "epoch": epoch, "global_position": p})
        return out

    def shard_row(self, sequence: int) -> tuple[str, int]:
        k = int(np.searchsorted(self.shard_start, sequence, side="right") - 1)
        return self.files[k], int(sequence - self.shard_start[k])

    def sequence_number(self, shard: str, row: int) -> int:
        return int(self.shard_start[self.files.index(shard)] + row)


def _sequences(rows: list[dict[str, Any]], places: list[tuple[str, int]], split: str, width: int,
               reads: list[dict[str, int]]) -> list[TracedSequence]:
    out = []
    for record, (shard, row), read in zip(rows, places, reads):
        offsets = list(record["doc_offsets"]) + [width]
        segments = [SequenceSegment(doc_id=d, start=int(o), tokens=int(offsets[i + 1] - o), copy=int(c))
                    for i, (d, o, c) in enumerate(zip(record["doc_ids"], record["doc_offsets"], record["doc_copies"]))]
        fields = {k: read[k] for k in ("step", "rank", "position", "micro_batch", "epoch", "global_position") if k in read}
        out.append(TracedSequence(split=split, shard=shard, row=row, seq_id=int(record["seq_id"]), source=record["source"],
                                  segments=segments, **fields))
    return out


def _width(storage: st.Storage, shard: str) -> int:
    fs, path = storage.arrow_fs(shard)
    with fs.open_input_file(path) as f:
        return pa.ipc.open_file(f).schema.field("tokens").type.list_size


def _read_rows(storage: st.Storage, places: list[tuple[str, int]]) -> list[dict[str, Any]]:
    from pipeline.trace_index import read_rows

    return read_rows(storage, places, SEQUENCE_COLUMNS)


def order_of(train_config: Any, seed: int, tokenize_dir: str, tokenize_manifest: dict, storage: st.Storage) -> StepOrder:
    config = train_config if isinstance(train_config, TrainStageConfig) else TrainStageConfig.model_validate(train_config)
    seq_len = int(tokenize_manifest["summary"]["data"]["seq_len"])
    return StepOrder(config, seed, seq_len, mf.dataset_files(tokenize_manifest, tokenize_dir, "train"), storage)


def sequences_at_step(train_config: Any, seed: int, tokenize_dir: str, tokenize_manifest: dict, storage: st.Storage,
                      step: int, rank: Optional[int] = None, position: Optional[int] = None) -> list[TracedSequence]:
    """The sequences optimizer step ``step`` trained on (one rank's, or one of them), with their
    shard rows and the document segments each holds."""
    order = order_of(train_config, seed, tokenize_dir, tokenize_manifest, storage)
    reads = order.at_step(step, rank, position)
    places = [order.shard_row(r["sequence"]) for r in reads]
    return _sequences(_read_rows(storage, places), places, "train", order.loader.width, reads)


def sequences_at_row(train_config: Any, seed: int, tokenize_dir: str, tokenize_manifest: dict, storage: st.Storage,
                     shard: str, row: int) -> list[TracedSequence]:
    """The sequence at a token shard row (``shard``: its path, or its path below the stage folder,
    or its file name when that is unique), once for every step that read it (none: never read)."""
    matches = [(split, f) for split in SPLITS if split in tokenize_manifest["datasets"]
               for f, rows in zip(mf.dataset_files(tokenize_manifest, tokenize_dir, split),
                                  [e["rows"] for e in tokenize_manifest["datasets"][split]["files"]])
               if f == shard or f.endswith("/" + shard.lstrip("/"))]
    if len(matches) != 1:
        names = [e["path"] for split in SPLITS for e in tokenize_manifest["datasets"].get(split, {}).get("files", [])]
        raise TraceError(f"shard {shard!r} {'names several shards' if matches else 'is not a shard'} of {tokenize_dir}"
                         f" (its shards: {', '.join(names)})")
    split, file = matches[0]
    rows = next(e["rows"] for e in tokenize_manifest["datasets"][split]["files"] if file.endswith("/" + e["path"]))
    if not 0 <= row < rows:
        raise TraceError(f"row {row} is not a row of {file} (rows 0 to {rows - 1})")
    (record,) = _read_rows(storage, [(file, row)])
    width = _width(storage, file)
    if split != "train" or train_config is None:
        return _sequences([record], [(file, row)], split, width, [{}])
    order = order_of(train_config, seed, tokenize_dir, tokenize_manifest, storage)
    number = order.sequence_number(file, row)
    return [s for read in order.reads_of([number])[number] or [{}] for s in _sequences([record], [(file, row)], split, width, [read])]


def sequences_of_document(train_config: Any, seed: int, tokenize_dir: str, tokenize_manifest: dict, storage: st.Storage,
                          doc_id: str, lookup: Lookup) -> list[TracedSequence]:
    """Every shard row that holds a segment of the document (train and validation), each with every
    step that read it (none: never read by this run)."""
    out: list[TracedSequence] = []
    order = None
    for split in SPLITS:
        if split not in tokenize_manifest["datasets"]:
            continue
        places = lookup(tokenize_dir, tokenize_manifest, split, "doc_ids", [doc_id]).get(doc_id, [])
        places = sorted(set(places))
        if not places:
            continue
        rows = _read_rows(storage, places)
        width = _width(storage, places[0][0])
        if split != "train" or train_config is None:  # validation, or shards no train stage reads
            out += _sequences(rows, places, split, width, [{}] * len(places))
            continue
        order = order or order_of(train_config, seed, tokenize_dir, tokenize_manifest, storage)
        numbers = [order.sequence_number(shard, row) for shard, row in places]
        reads = order.reads_of(numbers)
        for record, place, number in zip(rows, places, numbers):
            for read in reads[number] or [{}]:
                out += _sequences([record], [place], split, width, [read])
    return out
