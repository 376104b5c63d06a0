"""``.json`` files: one array of records, one object, or JSON Lines under another name."""

from __future__ import annotations

import io
import json
import re
from typing import Any, Iterator, Optional

import pyarrow as pa

from pipeline import storage as st
from pipeline.context import PartContext
from stages.ingest.config import SourceConfig
from stages.ingest.decompress import DECOMPRESS_ERRORS, Counting, Prefixed, open_decompressed, stream_position, unreadable_detail
from stages.ingest.readers.jsonl import LineState, jsonl_checked, jsonl_records
from stages.ingest.records import (BOM, INVALID_JSON, INVALID_UTF8, MISSING, RAW_LIMIT, UNREADABLE_FILE, Batcher,
                                   check_record)

_WS = re.compile(r"[ \t\n\r]*")
_WS_BYTES = re.compile(rb"[ \t\n\r]*")


def _read_rest(stream: Any) -> tuple[bytes, Optional[BaseException]]:
    chunks = []
    try:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except DECOMPRESS_ERRORS as e:
        return b"".join(chunks), e
    return b"".join(chunks), None


def _read_head(stream: Any) -> tuple[bytes, bool, Optional[BaseException]]:
    """The start of a file up to the end of its first non-blank line: (bytes, at end of file, error)."""
    head = bytearray()  # grown in place and searched only where it grew: linear in a long first line
    blank_to = 0  # the leading BOM and whitespace end here (so far)
    while True:
        try:
            chunk = stream.read(1 << 16)
        except DECOMPRESS_ERRORS as e:
            return bytes(head), True, e
        if not chunk:
            return bytes(head), True, None
        searched_to = len(head)
        head += chunk
        if blank_to == 0 and head.startswith(BOM):
            blank_to = len(BOM)
        blank_to = _WS_BYTES.match(head, blank_to).end()
        if blank_to < len(head) and head.find(b"\n", max(blank_to, searched_to)) >= 0:
            return bytes(head), False, None


def _first_line_is_a_value(body: bytes) -> bool:
    start = _WS_BYTES.match(body).end()
    end = body.find(b"\n", start)
    line = body[start:] if end < 0 else body[start:end]
    try:
        json.loads(line.decode("utf-8", "surrogateescape"))
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def read_json(storage: st.Storage, uri: str, relpath: str, source: SourceConfig, batch_rows: int, ctx: Optional[PartContext] = None) -> Iterator[pa.Table]:
    """A ``.json`` file (optionally .gz/.zst), decided by its content:

    * it starts with ``[``: one JSON array, each element a record (locator: the 0-based element
      index, origin ``file#index``). Broken JSON keeps the elements before the damage and
      quarantines the rest of the file as one ``invalid_json`` record naming the line and column;
    * it holds exactly one object spread over several lines: one record (locator: its first line);
    * otherwise it is JSON Lines (as many ``.json`` files are) and is read exactly like ``.jsonl``,
      streamed, with the same ids.

    Memory: JSON Lines stream (one line at a time). An array or a multi-line object is read whole:
    the decompressed bytes, then their decoded text (1-4 bytes per character) -- about 2-5x the
    decompressed size at the peak -- plus one parsed element at a time; rows still leave in batches
    of ``batch_rows``. Fine for files of up to a few hundred MB; write bigger data as JSONL.
    """
    b = Batcher(source.name, relpath, batch_rows)
    stream, raw_file = open_decompressed(storage, uri)
    counted = Counting(stream)
    try:
        head, at_end, error = _read_head(counted)
        body = head[len(BOM):] if head.startswith(BOM) else head
        start = _WS_BYTES.match(body).end()
        is_array = body[start:start + 1] == b"["
        if not is_array and error is None and (at_end or _first_line_is_a_value(body)):
            # JSON Lines (or a one-line file): streamed, exactly like .jsonl
            yield from jsonl_checked(Prefixed(head, counted), counted, raw_file, b, source, ctx)
            yield from b.flush()
            return
        if error is None and not at_end:
            rest, error = _read_rest(counted)
            head += rest
            del rest
        position = stream_position(counted, raw_file)
    finally:
        stream.close()
        raw_file.close()
    data = head[len(BOM):] if head.startswith(BOM) else head
    del head
    text = data.decode("utf-8", "surrogateescape")  # bytes that are not UTF-8 stay recoverable (raw)
    if is_array:
        del data
        cut = None if error is None else unreadable_detail(error, "the elements before", position)
        yield from _json_array(b, text, _WS.match(text).end(), source, cut)
        return
    decoder = json.JSONDecoder()
    start = _WS.match(text).end()
    try:
        value, end = decoder.raw_decode(text, start)
    except (json.JSONDecodeError, RecursionError):
        value, end = MISSING, start
    if value is not MISSING and _WS.match(text, end).end() == len(text) and error is None:
        del data
        line = 1 + text.count("\n", 0, start)
        raw = text[start:end].encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            b.quarantine(line, INVALID_UTF8, f"byte {e.start}: {e.reason}", raw)
        else:
            check_record(b, line, value, raw, source)
        yield from b.flush()
        return
    # JSON Lines after all (e.g. a broken first line), already in memory
    del text
    if error is not None:  # a damaged stream: its last, partial line is not a record (as in read_jsonl)
        data = data[: data.rfind(b"\n") + 1]
    state = LineState()
    yield from jsonl_records(io.BytesIO(data), b, source, state, ctx)
    if error is not None:
        b.quarantine(state.line + 1, UNREADABLE_FILE, unreadable_detail(error, f"line {state.line}", position), b"")
    yield from b.flush()


def _json_array(b: Batcher, text: str, pos: int, source: SourceConfig, cut: Optional[str]) -> Iterator[pa.Table]:
    """The elements of the JSON array starting at ``text[pos] == '['``, parsed one at a time."""
    decoder = json.JSONDecoder()
    n = len(text)
    index = 0
    counted_to, line = 0, 1

    def line_at(p: int) -> int:
        nonlocal counted_to, line
        line += text.count("\n", counted_to, p)
        counted_to = p
        return line

    def stop(p: int, message: str) -> None:
        """Everything from ``p`` on cannot be parsed: one record for the rest of the file."""
        rest = text[p:].encode("utf-8", "surrogateescape")
        kept = "" if len(rest) <= RAW_LIMIT else f", the first {RAW_LIMIT} in raw"
        where = f"element {index} (line {line_at(p)}): {message}; the rest of the file ({len(rest)} bytes{kept}) is not read"
        if cut is not None:
            b.quarantine(index, UNREADABLE_FILE, f"{where}; {cut}", rest[:RAW_LIMIT])
        else:
            b.quarantine(index, INVALID_JSON, f"{where} -- fix the JSON to read it", rest[:RAW_LIMIT])

    pos = _WS.match(text, pos + 1).end()
    closed = pos < n and text[pos] == "]"
    if closed:
        pos += 1
    while not closed:
        if pos >= n:
            stop(pos, "the file ends inside the array")
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            stop(pos, f"{e.msg} at line {e.lineno} column {e.colno}")
            break
        except RecursionError:
            stop(pos, "nested too deeply to parse")
            break
        raw = text[pos:end].encode("utf-8", "surrogateescape")
        where = f"element {index} (line {line_at(pos)}): "
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            b.quarantine(index, INVALID_UTF8, f"{where}byte {e.start}: {e.reason}", raw)
        else:
            check_record(b, index, value, raw, source, origin_kind="file", where=where)
        if b.full():
            yield from b.flush()
        index += 1
        pos = _WS.match(text, end).end()
        if pos < n and text[pos] == ",":
            pos = _WS.match(text, pos + 1).end()
        elif pos < n and text[pos] == "]":
            closed, pos = True, pos + 1
        elif pos < n:
            stop(pos, f"expected ',' or ']' after element {index - 1}")
            break
    if closed:
        pos = _WS.match(text, pos).end()
        if pos < n:
            stop(pos, "extra data after the array's closing ']'")
        elif cut is not None:
            b.quarantine(index, UNREADABLE_FILE, cut, b"")
    yield from b.flush()
