"""Uniform access to local paths and object stores (``s3://``) through fsspec.

Every path the pipeline touches goes through :class:`Storage`, so a ``work_dir`` or an input
can be local or on S3 without the stages knowing. Writes that must be atomic (manifests) use
write-to-temporary-then-rename locally and a single PUT on object stores (which is atomic per
object).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import fsspec
import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


@dataclass(frozen=True)
class Storage:
    """Filesystem options for remote schemes, e.g. ``{"s3": {"endpoint_url": ..., "key": ...}}``.

    The options may hold credentials: they are passed to workers in memory and never logged.
    """

    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fs(self, uri: str) -> fsspec.AbstractFileSystem:
        if is_remote(uri):
            protocol = uri.split("://", 1)[0]
            opts = dict(self.options.get(protocol, {}))
            if protocol == "s3":
                opts = _s3fs_options(opts)
            return fsspec.filesystem(protocol, **opts)
        return fsspec.filesystem("file")

    def arrow_fs(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the path inside it, for zero-copy Parquet/IPC IO."""
        if is_remote(uri):
            return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs(uri))), uri.split("://", 1)[1]
        return pafs.LocalFileSystem(), os.path.abspath(_strip_file_scheme(uri))

    def open(self, uri: str, mode: str = "rb"):
        return self.fs(uri).open(_strip_file_scheme(uri), mode)

    def exists(self, uri: str) -> bool:
        return self.fs(uri).exists(_strip_file_scheme(uri))

    def read_bytes(self, uri: str) -> bytes:
        with self.open(uri, "rb") as f:
            return f.read()

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def write_bytes_atomic(self, uri: str, data: bytes) -> None:
        """Write a whole object so readers never see a partial one."""
        if is_remote(uri):
            with self.open(uri, "wb") as f:  # one PUT: atomic per object on S3
                f.write(data)
            return
        path = _strip_file_scheme(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create the object only if it does not exist (True), atomically: a local O_EXCL create,
        an S3 conditional PUT (If-None-Match: *). False when it already exists."""
        if is_remote(uri):
            fs = self.fs(uri)
            try:
                fs.pipe_file(_strip_file_scheme(uri), data, mode="create")
            except FileExistsError:
                return False
            except OSError as e:  # s3fs raises the 412 as a generic OSError on some versions
                if "PreconditionFailed" in str(e) or "412" in str(e):
                    return False
                raise
            return True
        path = _strip_file_scheme(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def write_json_atomic(self, uri: str, obj: Any) -> None:
        self.write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def makedirs(self, uri: str) -> None:
        if not is_remote(uri):
            os.makedirs(_strip_file_scheme(uri), exist_ok=True)

    def glob(self, pattern: str) -> list[str]:
        """Expand a glob (or return a single existing file/dir), full URIs, sorted."""
        fs = self.fs(pattern)
        path = _strip_file_scheme(pattern)
        if any(ch in path for ch in "*?["):
            found = fs.glob(path)
        else:
            found = [path] if fs.exists(path) else []
        if is_remote(pattern):
            protocol = pattern.split("://", 1)[0]
            return sorted(f"{protocol}://{p}" if "://" not in p else p for p in found)
        return sorted(found)

    def find_files(self, uri: str) -> list[str]:
        """All files below a directory, recursively, as full URIs, sorted."""
        fs = self.fs(uri)
        found = fs.find(_strip_file_scheme(uri))
        if is_remote(uri):
            protocol = uri.split("://", 1)[0]
            return sorted(f"{protocol}://{p}" for p in found)
        return sorted(found)

    def isdir(self, uri: str) -> bool:
        return self.fs(uri).isdir(_strip_file_scheme(uri))

    def info(self, uri: str) -> dict[str, Any]:
        return self.fs(uri).info(_strip_file_scheme(uri))

    def size(self, uri: str) -> int:
        return int(self.info(uri).get("size") or 0)

    def rm(self, uri: str, recursive: bool = True) -> None:
        fs = self.fs(uri)
        path = _strip_file_scheme(uri)
        if fs.exists(path):
            fs.rm(path, recursive=recursive)

    def ls_dirs(self, uri: str) -> list[str]:
        fs = self.fs(uri)
        path = _strip_file_scheme(uri)
        if not fs.exists(path):
            return []
        out = []
        for entry in fs.ls(path, detail=True):
            if entry.get("type") == "directory":
                name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
                out.append(name)
        return sorted(out)

    def missing_bucket(self, uri: str) -> Optional[str]:
        """The bucket of an ``s3://`` URI when it positively does not exist (else None: a local path,
        an existing bucket, or one this identity may not look at), so that an error can name it
        (S3 only says "The specified bucket does not exist")."""
        if not uri.startswith("s3://"):
            return None
        bucket = uri[len("s3://"):].split("/", 1)[0]
        try:
            self.fs(uri).info(bucket)
        except FileNotFoundError:
            return bucket
        except Exception:
            return None
        return None

    def file_identity(self, uri: str) -> dict[str, Any]:
        """What identifies a source file's version cheaply: size plus mtime or ETag."""
        info = self.info(uri)
        ident: dict[str, Any] = {"size": int(info.get("size") or 0)}
        for key in ("ETag", "etag", "mtime", "LastModified"):
            if key in info and info[key] is not None:
                value = info[key]
                ident[key.lower()] = value if isinstance(value, (int, float, str)) else str(value)
                break
        return ident


def _s3fs_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Accept friendly keys (endpoint_url, region) and map them to s3fs's constructor."""
    out = {k: v for k, v in opts.items() if k not in {"endpoint_url", "region"}}
    client_kwargs = dict(out.pop("client_kwargs", {}) or {})
    if opts.get("endpoint_url"):
        client_kwargs["endpoint_url"] = opts["endpoint_url"]
    if opts.get("region"):
        client_kwargs["region_name"] = opts["region"]
    if client_kwargs:
        out["client_kwargs"] = client_kwargs
    out.setdefault("use_listings_cache", False)
    # Throttling and 5xx answers are retried with exponential backoff and jitter by botocore.
    config_kwargs = dict(out.pop("config_kwargs", {}) or {})
    config_kwargs.setdefault("retries", {"max_attempts": 10, "mode": "standard"})
    out["config_kwargs"] = config_kwargs
    return out


@dataclass(frozen=True)
class OversizedLine:
    """A line longer than ``max_line_bytes``: its size and its first bytes (the rest was read past,
    never held in memory)."""

    size: int
    head: bytes


def iter_lines(fileobj, chunk_size: int = 1 << 16, max_line_bytes: int | None = None,
               head_bytes: int = 1 << 10) -> Iterable[bytes | OversizedLine]:
    """Yield raw lines (without the trailing newline) from a binary stream.

    Linear in the bytes read, however long a line is: the pieces of a line that spans chunks are
    kept in a list and joined once (re-splitting a growing buffer per chunk is quadratic: a 100 MB
    line took a minute). A line longer than ``max_line_bytes`` is not kept: it comes out as an
    :class:`OversizedLine` (its size and first ``head_bytes``), so one line cannot take a worker's
    memory.
    """
    pieces: list[bytes] = []  # the current line's pieces so far (it spans chunks)
    held = 0  # bytes in ``pieces``
    skipped: OversizedLine | None = None  # the current line once it passed the limit

    def extend(piece: bytes) -> None:
        nonlocal held, skipped
        if skipped is not None:
            skipped = OversizedLine(skipped.size + len(piece), skipped.head)
        elif max_line_bytes is not None and held + len(piece) > max_line_bytes:
            head = bytearray()
            for p in (*pieces, piece):
                if len(head) >= head_bytes:
                    break
                head += p[: head_bytes - len(head)]
            skipped = OversizedLine(held + len(piece), bytes(head))
            pieces.clear()
            held = 0
        elif piece:
            pieces.append(piece)
            held += len(piece)

    def finish() -> bytes | OversizedLine:
        nonlocal held, skipped
        if skipped is not None:
            out: bytes | OversizedLine = skipped
        else:
            out = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        held, skipped = 0, None
        return out

    while True:
        chunk = fileobj.read(chunk_size)
        if not chunk:
            break
        lines = chunk.split(b"\n")
        extend(lines[0])
        if len(lines) == 1:
            continue
        yield finish()
        for line in lines[1:-1]:
            if max_line_bytes is not None and len(line) > max_line_bytes:
                yield OversizedLine(len(line), line[:head_bytes])
            else:
                yield line
        extend(lines[-1])
    if held or skipped is not None:
        yield finish()
