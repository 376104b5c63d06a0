"""Opening the tokenize stage's token shards for the training loader: each shard's sequence width
and the row count of each record batch (a *chunk*), without reading the tokens. Local shards are
memory-mapped and asked; remote shards (``s3://``) cost one batched size request, one ranged read
of each footer, and then either the header of the *last* batch (when the schema metadata
``lmpipe.rows_per_batch`` says how many rows the others hold: a hint, checked when each batch is
read) or every batch's header (a few hundred bytes each, fetched concurrently)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pipeline import storage as st
from stages.tokenize.arrow_footer import footer_blocks, message_rows
from stages.tokenize.shards import ROWS_PER_BATCH_KEY

_TAIL_BYTES = 16 << 10  # first read of a remote file's end: the footer of a shard of <= ~500 batches


class ShardError(ValueError):
    """A shard the loader cannot use: the message names the file."""


def tokens_view(batch: pa.RecordBatch, uri: str, index: int) -> np.ndarray:
    col = batch.column("tokens")
    width = col.type.list_size
    flat = col.values.slice(col.offset * width, len(col) * width)
    if flat.null_count:
        raise ShardError(f"{uri}: record batch {index} has null tokens")
    return flat.to_numpy(zero_copy_only=True).reshape(len(col), width)


def check_schema(schema: pa.Schema, uri: str) -> int:
    """The shard's sequence width (seq_len + 1)."""
    idx = schema.get_field_index("tokens")
    if idx < 0:
        raise ShardError(f"{uri}: not a token shard (no 'tokens' column; columns: {schema.names})")
    typ = schema.field(idx).type
    if not pa.types.is_fixed_size_list(typ) or not pa.types.is_integer(typ.value_type):
        raise ShardError(f"{uri}: 'tokens' is {typ}, expected fixed_size_list<integer> (one sequence per row)")
    return typ.list_size


@dataclass
class Shard:
    uri: str
    width: int
    rows: list[int]  # per record batch
    hinted: bool = False  # rows come (partly) from the rows_per_batch hint: check them when read
    reader: Any = None  # local: the memory-mapped file reader
    blocks: Optional[list[tuple[int, int, int]]] = None  # remote: byte ranges of the batches
    schema: Optional[pa.Schema] = None

    @property
    def token_bytes(self) -> int:
        """Bytes per token id as stored (2 for uint16, 4 for uint32): what a chunk takes in memory,
        since chunks are zero-copy views of the shard's buffers."""
        return self.schema.field("tokens").type.value_type.bit_width // 8


def open_local_shard(uri: str) -> Shard:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    try:
        reader = pa.ipc.open_file(pa.memory_map(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: shard listed but missing") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{uri}: not an Arrow IPC file (truncated or foreign): {e}") from None
    width = check_schema(reader.schema, uri)
    rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]  # zero-copy: headers only
    return Shard(uri, width, rows, reader=reader, schema=reader.schema)


def open_remote_shards(storage: st.Storage, uris: list[str]) -> tuple[list[Shard], int]:
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
            blocks = footer_blocks(footer)
        except (pa.ArrowInvalid, struct.error, IndexError) as e:
            raise ShardError(f"{uri}: not an Arrow IPC file (unreadable footer: {e})") from None
        if any(off + meta + body > size - footer_len - 10 for off, meta, body in blocks):
            raise ShardError(f"{uri}: truncated (a record batch lies beyond the data)")
        width = check_schema(schema, uri)
        hint = (schema.metadata or {}).get(ROWS_PER_BATCH_KEY)
        shard = Shard(uri, width, [0] * len(blocks), blocks=blocks, schema=schema)
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
                shards[s].rows[i] = message_rows(meta)
            except (struct.error, IndexError) as e:
                raise ShardError(f"{shards[s].uri}: record batch {i} has an unreadable header ({e})") from None
    return shards, fetched
