"""Reading .gz and .zst files as streams, and saying where a damaged one stopped."""

from __future__ import annotations

import gzip
import zlib
from typing import Any, Optional

import zstandard

from pipeline import storage as st

# What reading a damaged file raises: gzip (EOFError when truncated, BadGzipFile -- an OSError -- on a
# bad header or CRC, zlib.error on bad deflate data), zstd (ZstdError; EOFError from ZstdStream when
# truncated), the storage (OSError).
DECOMPRESS_ERRORS = (OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError)


class ZstdStream:
    """A .zst file decompressed frame after frame. Unlike zstandard's ``stream_reader``, which ends
    quietly, a file that stops inside a frame raises EOFError (as gzip does). An error is raised
    only once everything decoded before it has been returned, so no complete line is lost. Memory:
    one 64 KiB compressed chunk and what it decompresses to."""

    def __init__(self, raw: Any, read_size: int = 1 << 16):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None
        self._buf = bytearray()
        self._error: Optional[BaseException] = None
        self._eof = False
        self._read_size = read_size

    def read(self, size: int = -1) -> bytes:
        while not self._eof and self._error is None and (size < 0 or len(self._buf) < size):
            chunk = self._raw.read(self._read_size)
            if not chunk:
                self._eof = True
                if self._frame is not None:
                    self._error = EOFError("the file ends inside a zstd frame: it is truncated")
                break
            try:
                self._feed(chunk)
            except zstandard.ZstdError as e:
                self._error = e
        if not self._buf and self._error is not None:
            raise self._error
        n = len(self._buf) if size < 0 else min(size, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _feed(self, data: bytes) -> None:
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            self._buf += self._frame.decompress(data)
            if self._frame.eof:
                data = self._frame.unused_data
                self._frame = None
            else:
                data = b""

    def close(self) -> None:
        pass


class Counting:
    """Counts the bytes read through a stream (to say where a damaged file stopped)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.n += len(data)
        return data


class Prefixed:
    """A stream that first returns ``prefix`` (bytes already read), then the rest of ``stream``."""

    def __init__(self, prefix: bytes, stream: Any):
        self.prefix = prefix
        self.offset = 0  # not re-slicing the prefix per read: that is quadratic in a long first line
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        if self.offset < len(self.prefix):
            end = len(self.prefix) if size < 0 else self.offset + size
            out = self.prefix[self.offset:end]
            self.offset += len(out)
            if self.offset >= len(self.prefix):
                self.prefix, self.offset = b"", 0
            return out
        return self.stream.read(size)


COMPRESSED_SUFFIXES = (".gz", ".zst")


def is_compressed(uri: str) -> bool:
    """Whether a file is read through a decompressor (so it cannot be entered in the middle)."""
    return uri.lower().endswith(COMPRESSED_SUFFIXES)


def open_decompressed(storage: st.Storage, uri: str):
    """(stream of the decompressed bytes, the raw file): .gz and .zst by name, else the file itself."""
    f = storage.open(uri, "rb")
    low = uri.lower()
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=f, mode="rb"), f
    if low.endswith(".zst"):
        return ZstdStream(f), f
    return f, f


def stream_position(counted: Counting, raw_file: Any) -> str:
    """Where reading stopped, for an ``unreadable_file`` detail (call before closing the file)."""
    try:
        where = f" from the first {raw_file.tell()} bytes of the file"
    except Exception:  # a stream that cannot tell its position
        where = ""
    return f"{counted.n} bytes decompressed{where}"


def unreadable_detail(e: BaseException, after: str, position: str) -> str:
    return (f"{type(e).__name__}: {e} (after {after}; {position}); what was read before is kept --"
            f" re-fetch or repair the file to read the rest")
