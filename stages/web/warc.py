"""WARC and WET files read record by record, each record with the byte offset where it starts.

The framing (where a record starts and ends) is done here; fastwarc parses each framed record
(WARC headers, HTTP status and headers, chunked/compressed payloads). fastwarc and warcio both
read a whole file faster or as fast, but both stop without a word at a truncated gzip member,
and warcio also at a corrupt one (``bench/warc_readers.py``, BENCHMARKS.md): a crawl file that
lost its tail would lose documents silently. Here every gzip member (or zstd frame) is
decompressed on its own, so:

* a record knows the compressed offset of the member it starts in (the offset Common Crawl's
  indexes use), and a damaged member is reported at its offset with what went wrong;
* after a corrupt member, reading resumes at the next member that starts a WARC record;
* a file can be read from any byte range: a reader starting at byte ``start`` syncs to the first
  member at or after it, and a reader ending at ``end`` finishes the record it is in. Ranges that
  tile a file therefore read every record exactly once (one big WARC, several workers).

Uncompressed ``.warc`` files are framed by the records' ``Content-Length``; a ``.warc.zst`` is
read frame by frame (without a dictionary). Both are read whole by one reader.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Literal, Optional, Union

import zstandard

Compression = Literal["gzip", "zstd", "none"]

GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
RECORD_START = b"WARC/"

# Quarantine reasons (stable names: users filter on them).
TRUNCATED_MEMBER = "truncated_member"  # the file ends inside a gzip member / zstd frame / record
CORRUPT_MEMBER = "corrupt_member"  # a gzip member / zstd frame that does not decompress (bad data, CRC)
UNPARSEABLE_RECORD = "unparseable_record"  # decompressed bytes that are not a WARC record

RAW_LIMIT = 64 << 10  # bytes of a damaged record kept in the quarantine
MAX_HEADER_BYTES = 1 << 20
MAX_PENDING_BYTES = 64 << 20  # a WARC header block longer than this is not a WARC header
CONTENT_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:[ \t]*(\d+)[ \t]*\r?$")


@dataclass(frozen=True)
class RawRecord:
    """One framed WARC record: its bytes from ``WARC/1.x`` to the end of its block."""

    offset: int  # compressed offset of the member it starts in; for an uncompressed file, of its first byte
    data: bytes


@dataclass(frozen=True)
class Damage:
    """Bytes that could not be read as a record, where they are and why."""

    offset: int
    reason: str
    detail: str
    raw: bytes


Item = Union[RawRecord, Damage]


def compression_of(name: str) -> Optional[Compression]:
    """The compression a WARC/WET file's name says; None when the name is not a WARC/WET name."""
    low = name.lower()
    for suffix, kind in ((".gz", "gzip"), (".zst", "zstd"), ("", "none")):
        if low.endswith((".warc" + suffix, ".wet" + suffix)):
            return kind  # type: ignore[return-value]
    return None


class _Framer:
    """Cuts decompressed bytes into records. ``feed`` takes the bytes of one member (or, for an
    uncompressed file, a chunk at an absolute position) and yields every record it completes."""

    def __init__(self, per_member: bool):
        self.per_member = per_member
        self.buf = bytearray()
        # (index in buf, file offset): where each fed piece starts, to give records their offset
        self.pieces: list[tuple[int, int]] = []
        self.skipping = False  # after an unparseable record: drop the rest of its member

    @property
    def empty(self) -> bool:
        return not self.buf.strip(b"\r\n")

    def start_offset(self) -> int:
        return self._offset_at(0)

    def _offset_at(self, index: int) -> int:
        at, offset = self.pieces[0]
        for start, off in self.pieces:
            if start > index:
                break
            at, offset = start, off
        return offset if self.per_member else offset + (index - at)

    def new_member(self) -> None:
        self.skipping = False

    def feed(self, data: bytes, offset: int) -> Iterator[Item]:
        if self.skipping or not data:
            return
        self.pieces.append((len(self.buf), offset))
        self.buf += data
        yield from self._records()

    def _consume(self, n: int) -> None:
        del self.buf[:n]
        kept = [(start - n, off) for start, off in self.pieces if start - n > 0]
        first = [(0, self._offset_before(n))] if self.buf else []
        self.pieces = first + kept

    def _offset_before(self, n: int) -> int:
        """The piece offset that index ``n`` (before consuming) belongs to, re-based to 0."""
        at, offset = self.pieces[0]
        for start, off in self.pieces:
            if start > n:
                break
            at, offset = start, off
        return offset if self.per_member else offset + (n - at)

    def drop(self) -> bytes:
        """Forget a partial record (its member was damaged); returns its first bytes."""
        raw = bytes(self.buf[:RAW_LIMIT])
        self.buf.clear()
        self.pieces.clear()
        return raw

    def _records(self) -> Iterator[Item]:
        buf = self.buf
        while buf:
            lead = len(buf) - len(buf.lstrip(b"\r\n"))  # the CRLF CRLF after each record
            if lead:
                self._consume(lead)
                if not buf:
                    return
            if len(buf) < len(RECORD_START):
                return
            if not buf.startswith(RECORD_START):
                yield from self._unparseable(f"does not start with {RECORD_START.decode()}")
                continue
            head_end = buf.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
            if head_end < 0:
                if len(buf) >= MAX_HEADER_BYTES:
                    yield from self._unparseable(f"no end of the WARC header block in {MAX_HEADER_BYTES} bytes")
                    continue
                return
            match = CONTENT_LENGTH.search(bytes(buf[:head_end + 2]))
            if match is None:
                yield from self._unparseable("no Content-Length in the WARC header block")
                continue
            total = head_end + 4 + int(match.group(1))
            if len(buf) < total:
                return
            offset = self.start_offset()
            record = bytes(buf[:total])
            self._consume(total)
            yield RawRecord(offset, record)

    def _unparseable(self, why: str) -> Iterator[Item]:
        offset = self.start_offset()
        raw = bytes(self.buf[:RAW_LIMIT])
        if self.per_member:  # the member is the unit: skip the rest of it
            self.buf.clear()
            self.pieces.clear()
            self.skipping = True
            where = "the rest of its member is skipped"
        else:  # resume at the next line that starts a record
            nxt = self.buf.find(b"\n" + RECORD_START)
            cut = len(self.buf) if nxt < 0 else nxt + 1
            where = f"{cut} bytes skipped"
            self._consume(cut)
        yield Damage(offset, UNPARSEABLE_RECORD, f"byte {offset}: {why}; {where}", raw)


def _decompressor(kind: Compression):
    if kind == "gzip":
        return zlib.decompressobj(31)
    return zstandard.ZstdDecompressor().decompressobj()


_DECOMPRESS_ERRORS = (zlib.error, zstandard.ZstdError)


class _Source:
    """Reads a seekable stream through a buffer of ``chunk`` bytes and hands out views of at most
    ``FEED`` bytes: a decompressor copies what follows a member's end (``unused_data``), so a
    small feed keeps that copy small when members are small (a Common Crawl member is ~5-20 KB)."""

    FEED = 1 << 16

    def __init__(self, stream: BinaryIO, chunk: int):
        self.stream = stream
        self.chunk = chunk
        self.buf = b""
        self.buf_start = 0
        self.at_eof = False

    def read_at(self, pos: int, n: Optional[int] = None) -> memoryview:
        n = n or self.FEED
        offset = pos - self.buf_start
        if offset < 0 or offset + n > len(self.buf) and not (self.at_eof and offset <= len(self.buf)):
            self.stream.seek(pos)
            self.buf = self.stream.read(max(self.chunk, n))
            self.buf_start, offset = pos, 0
            self.at_eof = len(self.buf) < max(self.chunk, n)
        return memoryview(self.buf)[offset:offset + n]


def _starts_record(source: _Source, at: int, kind: Compression) -> bool:
    """Whether a member starting at ``at`` decompresses cleanly to the start of a WARC record."""
    dec = _decompressor(kind)
    pos, out = at, b""
    try:
        while len(out) < len(RECORD_START):
            data = source.read_at(pos, 1 << 16)
            if not data:
                return False
            out += dec.decompress(data, 1 << 12) if kind == "gzip" else dec.decompress(data)
            pos += len(data)
            if dec.eof and len(out) < len(RECORD_START):
                return False
    except _DECOMPRESS_ERRORS:
        return False
    return out.startswith(RECORD_START)


def sync(source: _Source, start: int, end: Optional[int], kind: Compression) -> Optional[int]:
    """The first offset in [start, end) where a member starting a WARC record begins; None if none."""
    magic = GZIP_MAGIC if kind == "gzip" else ZSTD_MAGIC
    pos = start
    window = 1 << 20
    while end is None or pos < end:
        data = bytes(source.read_at(pos, window + len(magic) - 1))
        if len(data) < len(magic):
            return None
        i = data.find(magic)
        while i >= 0 and (end is None or pos + i < end):
            if _starts_record(source, pos + i, kind):
                return pos + i
            i = data.find(magic, i + 1)
        pos += max(1, len(data) - len(magic) + 1)
    return None


def iter_records(stream: BinaryIO, kind: Compression, start: int = 0, end: Optional[int] = None,
                 chunk: int = 1 << 20) -> Iterator[Item]:
    """Every record that starts in [start, end) of ``stream`` (a seekable binary file), and every
    damaged stretch, in file order. ``end=None`` reads to the end of the file."""
    source = _Source(stream, chunk)
    if kind == "none":
        yield from _iter_plain(source, start, end)
    else:
        yield from _iter_members(source, kind, start, end)


def _iter_plain(source: _Source, start: int, end: Optional[int]) -> Iterator[Item]:
    if start != 0 or end is not None:
        raise ValueError("an uncompressed WARC is read whole (only gzip members can be split)")
    framer = _Framer(per_member=False)
    pos = 0
    while True:
        data = source.read_at(pos)
        if not data:
            break
        yield from framer.feed(data, pos)
        pos += len(data)
    if not framer.empty:
        offset = framer.start_offset()
        yield Damage(offset, TRUNCATED_MEMBER, f"byte {offset}: the file ends inside a record ({len(framer.buf)} bytes"
                                               f" of it read)", framer.drop())


def _iter_members(source: _Source, kind: Compression, start: int, end: Optional[int]) -> Iterator[Item]:
    what = "gzip member" if kind == "gzip" else "zstd frame"
    framer = _Framer(per_member=True)
    # records of the member being read are held until it ends cleanly (its CRC checked), so a
    # corrupt member yields no half-trusted record -- except a member that holds more than
    # MAX_PENDING_BYTES of records (a whole file gzipped as one member), which is streamed
    pending: list[Item] = []
    pos: Optional[int] = start
    if start > 0:
        pos = sync(source, start, end, kind)
    while pos is not None:
        if end is not None and pos >= end and framer.empty:
            return
        member = pos
        dec = _decompressor(kind)
        framer.new_member()
        try:
            while True:
                data = source.read_at(pos)
                if not data:
                    if pos == member:  # the end of the file, between members
                        if not framer.empty:
                            offset = framer.start_offset()
                            yield Damage(offset, TRUNCATED_MEMBER,
                                         f"byte {offset}: the file ends inside a record that spans {what}s", framer.drop())
                        return
                    lost = sum(1 for r in pending if isinstance(r, RawRecord))
                    held = f", with {lost} complete record(s) in it that are not trusted" if lost else ""
                    yield Damage(member, TRUNCATED_MEMBER,
                                 f"byte {member}: the file ends inside the {what} that starts here ({pos - member} bytes"
                                 f" of it read{held}); what precedes it was read", framer.drop())
                    return
                out = dec.decompress(data)
                done = dec.eof
                pending.extend(framer.feed(out, member))
                pending_bytes = sum(len(r.data) for r in pending if isinstance(r, RawRecord))
                if done:
                    pos += len(data) - len(dec.unused_data)
                    yield from pending
                    pending = []
                    break
                pos += len(data)
                if pending_bytes > MAX_PENDING_BYTES:  # a whole file in one member: stream its records
                    yield from pending
                    pending = []
        except _DECOMPRESS_ERRORS as e:
            raw = framer.drop()
            lost = sum(1 for r in pending if isinstance(r, RawRecord))
            pending = []
            nxt = sync(source, member + 1, None, kind)
            rest = "the rest of the file is not read (no later member starts a record)" if nxt is None else \
                f"reading resumes at byte {nxt}"
            held = f"; {lost} complete record(s) in it are not trusted either" if lost else ""
            yield Damage(member, CORRUPT_MEMBER, f"byte {member}: the {what} that starts here does not decompress"
                                                 f" ({e}){held}; {rest}", raw)
            pos = nxt
            if pos is not None and end is not None and pos >= end:
                return


def iter_records_in_bytes(data: bytes, kind: Compression) -> Iterator[Item]:
    """``iter_records`` over bytes in memory (tests, small files)."""
    return iter_records(io.BytesIO(data), kind)
