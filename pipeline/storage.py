"""Uniform access to local paths and object stores (``s3://``) through fsspec.

Every path the pipeline touches goes through :class:`Storage`, so a ``work_dir`` or an input
can be local or on S3 without the stages knowing. Writes that must be atomic (manifests) use
write-to-temporary-then-rename locally and a single PUT on object stores (which is atomic per
object).

Leases and the commit marker need more than atomic writes: a write that happens only if the
object is still the version the writer last saw (:meth:`Storage.put_if`, :meth:`Storage.delete_if`),
and the age of an object measured on the storage's own clock (:meth:`Storage.read_versioned`,
:meth:`Storage.now`), never by comparing two hosts' clocks. On S3 these are conditional requests
(``If-Match`` on the ETag, ``If-None-Match: *``) and ``LastModified``; on a local or mounted disk,
a compare of the file's content and a rename under a short ``flock`` of the folder's
``.lmpipe-cas`` file, and modification times.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import posixpath
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import fsspec
import fsspec.asyn
import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


CAS_FILE = ".lmpipe-cas"  # a local folder's compare-and-swap lock (flock), never read
CAS_WAIT_S = 30.0  # a writer holds it for microseconds; longer means a stopped process holds it


class PreconditionFailed(Exception):
    """A conditional write or delete found another version of the object (or none)."""


@dataclass(frozen=True)
class Versioned:
    """An object's bytes, its version (the S3 ETag; locally a digest of the content) and the
    storage's time of its last write (``LastModified``; locally the file's mtime)."""

    data: bytes
    version: str
    modified: float


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def json_bytes(obj: Any) -> bytes:
    """How every JSON object of the work dir is written (manifests, leases)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def _s3_code(error: BaseException) -> Optional[str]:
    """The S3 error code behind an s3fs exception (s3fs keeps botocore's error as the cause)."""
    for e in (error, error.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
    return None


_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"}


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
        self.write_bytes_atomic(uri, json_bytes(obj))

    # -- conditional writes (leases, the commit marker) -----------------------------------------
    def read_versioned(self, uri: str) -> Versioned:
        """The object with its version and the storage's time of its last write
        (FileNotFoundError when it does not exist)."""
        if is_remote(uri):
            bucket, key = _split_s3(uri)
            fs = self.fs(uri)
            out, data = fsspec.asyn.sync(fs.loop, _s3_get, fs, bucket, key)  # body and ETag of one GET
            return Versioned(data, out["ETag"], out["LastModified"].timestamp())
        path = _strip_file_scheme(uri)
        with open(path, "rb") as f:
            data = f.read()
            modified = os.fstat(f.fileno()).st_mtime
        return Versioned(data, _content_version(data), modified)

    def version_of(self, uri: str) -> Optional[str]:
        """The object's current version, or None when it does not exist."""
        try:
            return self.read_versioned(uri).version
        except FileNotFoundError:
            return None

    def put_if(self, uri: str, data: bytes, version: Optional[str]) -> str:
        """Write the whole object only if its current version is ``version`` (``None``: only if it
        does not exist); returns the new version, raises :class:`PreconditionFailed` otherwise."""
        if is_remote(uri):
            bucket, key = _split_s3(uri)
            condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
            try:
                out = self.fs(uri).call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
            except (OSError, FileNotFoundError) as e:
                if isinstance(e, (FileExistsError, FileNotFoundError)) or _s3_code(e) in _CONFLICT_CODES:
                    raise PreconditionFailed(uri) from e
                raise
            return out["ETag"]
        path = _strip_file_scheme(uri)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:  # written before the flock: the compare-and-rename holds it for microseconds
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            with _folder_lock(folder):
                if _local_version(path) != version:
                    raise PreconditionFailed(uri)
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return _content_version(data)

    def delete_if(self, uri: str, version: str) -> None:
        """Delete the object only if its current version is ``version`` (else
        :class:`PreconditionFailed`: it changed, or is gone)."""
        if is_remote(uri):
            bucket, key = _split_s3(uri)
            fs = self.fs(uri)
            try:
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            except (OSError, FileNotFoundError) as e:
                if isinstance(e, FileNotFoundError) or _s3_code(e) in _CONFLICT_CODES:
                    raise PreconditionFailed(uri) from e
                raise
            return
        path = _strip_file_scheme(uri)
        with _folder_lock(os.path.dirname(os.path.abspath(path))):
            if _local_version(path) != version:
                raise PreconditionFailed(uri)
            os.remove(path)

    def now(self, folder: str) -> float:
        """The current time as the storage at ``folder`` sees it: the time it stamps on a probe
        object written now. Compared with an object's ``modified`` time, it gives the object's
        age on one clock, whatever the clocks of the hosts that wrote it."""
        probe = join(folder, f"_clock-{uuid.uuid4().hex}")
        if is_remote(folder):
            fs = self.fs(folder)
            bucket, key = _split_s3(probe)
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"")
            try:
                return fs.call_s3("head_object", Bucket=bucket, Key=key)["LastModified"].timestamp()
            finally:
                fs.call_s3("delete_object", Bucket=bucket, Key=key)
        path = _strip_file_scheme(probe)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.remove(path)

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


async def _s3_get(fs, bucket: str, key: str) -> tuple[dict[str, Any], bytes]:
    out = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with out["Body"] as body:
        return out, await body.read()


def _local_version(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return _content_version(f.read())
    except FileNotFoundError:
        return None


@contextmanager
def _folder_lock(folder: str) -> Iterator[None]:
    """An exclusive flock of the folder's CAS file for one compare-and-write, waited for
    ``CAS_WAIT_S`` at most (a process stopped while holding it would otherwise block everyone)."""
    fd = os.open(os.path.join(folder, CAS_FILE), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + CAS_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise OSError(e.errno, f"{folder}: could not lock {CAS_FILE} for {CAS_WAIT_S:.0f}s") from e
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing releases the flock


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
