"""Cutting a big input file into parts of bounded size, so that no part -- and no later stage's
part, since every later stage keeps one part per file it reads -- holds more than a bounded amount
of text, whatever the input's layout.

Reusable by any source stage:

* a line-delimited, uncompressed file (JSONL): :func:`line_spans` cuts it into byte ranges of about
  ``max_bytes`` each; a line belongs to the range it starts in, so every line is read exactly once.
  Ids stay those of an unsplit read because each span knows the number of its first line (the
  newlines before each cut are counted in parallel, one task per range, through ``FanOut``).
  :class:`LineRange` is the stream of one span's lines.
* a Parquet file: :func:`row_group_spans` groups its row groups (the smallest unit Parquet can
  read alone) into spans of at most ``max_bytes`` of uncompressed data, each knowing its first row.
* a compressed single stream (.gz, .zst) cannot be entered in the middle: it is read by one task,
  whose output files roll over every ``max_bytes`` of string data (``Stage.output_file_bytes``), so
  the stages after it still get bounded parts.

Each span depends only on the file and the bound, never on the number of workers, and the part ids
and output file names derive from the spans: the same config gives byte-identical outputs however
many workers read them. A file at or below the bound is one span (its part is as it always was).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.fanout import FanOut

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class LineSpan:
    """The lines of a file that start at a byte in ``[start, end)``; ``first_line`` is the 1-based
    number, in the whole file, of the first of them."""

    start: int
    end: int
    first_line: int


def range_starts(size: int, max_bytes: int) -> list[int]:
    """Where the byte ranges of a file of ``size`` bytes start: as few equal ranges as keep each at
    or below ``max_bytes`` (``[0]`` for a file within the bound)."""
    n = max(1, -(-size // max_bytes))
    return [size * i // n for i in range(n)]


def count_newlines(storage: st.Storage, uri: str, lo: int, hi: int) -> int:
    """Newlines in bytes ``[lo, hi)`` of a file (a task of :func:`line_spans`)."""
    n = 0
    with storage.open(uri, "rb") as f:
        f.seek(lo)
        left = hi - lo
        while left > 0:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def line_spans(storage: st.Storage, uri: str, size: int, max_bytes: int, fan_out: Optional[FanOut] = None) -> list[LineSpan]:
    """An uncompressed line-delimited file as spans of about ``max_bytes`` each (one span, without
    reading anything, when the file is within the bound).

    The line a span starts with is the first that starts at or after its nominal start ``s``: the
    one after the first newline at or after ``s - 1``. Its number is 2 + the newlines in
    ``[0, s - 1)``, counted range by range in parallel (the file is read once more, in parallel,
    before it is read for its records)."""
    starts = range_starts(size, max_bytes)
    if len(starts) == 1:
        return [LineSpan(0, size, 1)]
    bounds = [0] + [s - 1 for s in starts[1:]]  # newlines before each span's first line lie in [0, s - 1)
    items = [(storage, uri, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    counts = fan_out.map(count_newlines, items, step="count lines") if fan_out is not None else [count_newlines(*it) for it in items]
    spans, before = [LineSpan(0, starts[1], 1)], 0
    for i in range(1, len(starts)):
        before += counts[i - 1]
        spans.append(LineSpan(starts[i], starts[i + 1] if i + 1 < len(starts) else size, 2 + before))
    return spans


class LineRange:
    """A binary stream over the lines of ``f`` that start in ``[start, end)`` (see :class:`LineSpan`):
    it begins after the first newline at or after ``start - 1`` and ends with the first newline at
    or after ``end - 1`` (or at the end of the file). Memory: one chunk."""

    def __init__(self, f: Any, start: int, end: int):
        self._f = f
        self._end = end
        self._pending = b""
        self._done = False
        if start == 0:
            f.seek(0)
            self._pos = 0
            return
        f.seek(start - 1)
        pos = start - 1
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                self._done = True  # no newline after start - 1: no line starts in this span
                return
            i = chunk.find(b"\n")
            if i >= 0:
                self._pos = pos + i + 1
                self._pending = chunk[i + 1:]
                self._done = self._pos >= end  # the next line starts in a later span
                return
            pos += len(chunk)

    def read(self, size: int = -1) -> bytes:
        if self._done:
            return b""
        if self._pending:
            data, self._pending = self._pending, b""
        else:
            data = self._f.read(READ_CHUNK if size is None or size < 0 else size)
        if not data:
            self._done = True
            return b""
        k = max(0, self._end - 1 - self._pos)  # the span's last line ends at the first newline at >= end - 1
        if k < len(data):
            j = data.find(b"\n", k)
            if j >= 0:
                self._done = True
                data = data[: j + 1]
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RowGroupSpan:
    """Row groups ``[first, stop)`` of a Parquet file; ``first_row`` is the 0-based index of their
    first row in the whole file."""

    first: int
    stop: int
    first_row: int


def row_group_spans(storage: st.Storage, uri: str, max_bytes: int) -> Optional[list[RowGroupSpan]]:
    """A Parquet file's row groups in spans of at most ``max_bytes`` of uncompressed data (a row
    group larger than that alone), read from its footer; None when the footer cannot be read (the
    reader then quarantines the file as ``unreadable_file``)."""
    try:
        fs, path = storage.arrow_fs(uri)
        meta = pq.ParquetFile(path, filesystem=fs).metadata
    except (OSError, ValueError, EOFError):  # pyarrow's ArrowInvalid is a ValueError
        return None
    spans: list[RowGroupSpan] = []
    first, first_row, held, row = 0, 0, 0, 0
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        if g > first and held + rg.total_byte_size > max_bytes:
            spans.append(RowGroupSpan(first, g, first_row))
            first, first_row, held = g, row, 0
        held += rg.total_byte_size
        row += rg.num_rows
    spans.append(RowGroupSpan(first, meta.num_row_groups, first_row))
    return spans
