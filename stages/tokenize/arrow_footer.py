"""Just enough of the Arrow IPC file format's flatbuffers to find a shard's record batches without
reading them: where each batch lies (the footer's ``Block``s) and how many rows it holds (its
message header). Remote shards are opened with a ranged read of the footer and of a few headers
(:mod:`stages.tokenize.shard_index`), not by downloading the file."""

from __future__ import annotations

import struct
from typing import Optional


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


def footer_blocks(footer: bytes) -> list[tuple[int, int, int]]:
    """(offset, metadata length, body length) of every record batch, from an Arrow IPC file footer
    (flatbuffer ``Footer``: field 3 is ``recordBatches``, a vector of 24-byte ``Block`` structs)."""
    root = _u32(footer, 0)
    pos = _field(footer, root, 3)
    if pos is None:
        return []
    vec = pos + _u32(footer, pos)
    return [struct.unpack_from("<qi4xq", footer, vec + 4 + 24 * i) for i in range(_u32(footer, vec))]


def message_rows(meta: bytes) -> int:
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
