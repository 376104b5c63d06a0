"""JSON Lines (plain, .gz, .zst), streamed: one line and one batch in memory."""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

import pyarrow as pa

from pipeline import storage as st
from pipeline.context import PartContext
from stages.ingest.config import SourceConfig
from stages.ingest.decompress import DECOMPRESS_ERRORS, Counting, open_decompressed, stream_position, unreadable_detail
from stages.ingest.planning import LineRange, LineSpan
from stages.ingest.records import (BOM, INVALID_JSON, INVALID_UTF8, RAW_LIMIT, RECORD_TOO_LARGE, UNREADABLE_FILE, Batcher,
                                   check_record, too_large_detail)


class LineState:
    line = 0


def jsonl_records(stream: Any, b: Batcher, source: SourceConfig, state: LineState, ctx: Optional[PartContext]) -> Iterator[pa.Table]:
    for line in st.iter_lines(stream, max_line_bytes=source.max_record_bytes, head_bytes=RAW_LIMIT):
        state.line += 1
        line_no = state.line
        if isinstance(line, st.OversizedLine):
            b.quarantine(line_no, RECORD_TOO_LARGE, too_large_detail(line.size, source, len(line.head)), line.head)
            if b.full():
                yield from b.flush()
            continue
        if line_no == 1 and line.startswith(BOM):  # a UTF-8 byte order mark is not part of the first record
            line = line[len(BOM):]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            if ctx is not None:
                ctx.count("blank_lines")
            continue
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as e:
            b.quarantine(line_no, INVALID_UTF8, f"byte {e.start}: {e.reason}", line)
        else:
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as e:
                b.quarantine(line_no, INVALID_JSON, f"column {e.colno}: {e.msg}", line)
            else:
                check_record(b, line_no, record, line, source)
        if b.full():
            yield from b.flush()


def jsonl_checked(stream: Any, counted: Counting, raw_file: Any, b: Batcher, source: SourceConfig,
                  ctx: Optional[PartContext], first_line: int = 1) -> Iterator[pa.Table]:
    """JSON Lines from ``stream`` (its first line is line ``first_line`` of the file); a stream that
    breaks (truncated/corrupt .gz/.zst) keeps the lines read so far and adds one ``unreadable_file``
    record after them."""
    state = LineState()
    state.line = first_line - 1
    try:
        yield from jsonl_records(stream, b, source, state, ctx)
    except DECOMPRESS_ERRORS as e:
        b.quarantine(state.line + 1, UNREADABLE_FILE, unreadable_detail(e, f"line {state.line}", stream_position(counted, raw_file)), b"")


def read_jsonl(storage: st.Storage, uri: str, relpath: str, source: SourceConfig, batch_rows: int, ctx: Optional[PartContext] = None,
               span: Optional[LineSpan] = None) -> Iterator[pa.Table]:
    """JSON Lines, streamed (memory: one line and one batch). Locator: the 1-based line number in
    the file. With ``span`` (an uncompressed file only), just the lines that start in its byte range."""
    b = Batcher(source.name, relpath, batch_rows)
    stream, raw_file = open_decompressed(storage, uri)
    if span is not None:
        if stream is not raw_file:
            raise ValueError(f"{uri}: a compressed file cannot be read from a byte range")
        stream = LineRange(raw_file, span.start, span.end)
    counted = Counting(stream)
    try:
        yield from jsonl_checked(counted, counted, raw_file, b, source, ctx, span.first_line if span is not None else 1)
    finally:
        stream.close()
        raw_file.close()
    yield from b.flush()
