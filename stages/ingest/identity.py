"""What identifies a version of a source file, for the fingerprint: its size and mtime (local) or
ETag (S3) -- cheap, the default -- or, with ``identity: content``, the sha256 of its bytes.

The stat rule has two known faults: ``touch`` (a new mtime, the same bytes) recomputes the
pipeline, and an edit that keeps the size and restores the old mtime is not seen. The content rule
has neither, at the price of reading every file once; the hash is cached in the work dir
(``<work_dir>/_identity/``) under a key that a rewrite always changes -- size, mtime, ctime and
inode for a local file (ctime cannot be set back by ``touch -d`` or ``os.utime``), size and ETag for
an object -- so an unchanged file is not read again, while a same-size edit with the old mtime is.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from pipeline import storage as st

CACHE_FOLDER = "_identity"
READ_CHUNK = 1 << 20
STAT = "stat"
CONTENT = "content"
RULES = {STAT: "size and mtime/ETag", CONTENT: "content (sha256)"}


def _cache_key(storage: st.Storage, uri: str) -> dict[str, Any]:
    """What changes whenever the file's bytes may have: a local file's size, mtime, ctime and inode;
    an object's size and ETag."""
    if not st.is_remote(uri):
        s = os.stat(uri[len("file://"):] if uri.startswith("file://") else uri)
        return {"size": s.st_size, "mtime_ns": s.st_mtime_ns, "ctime_ns": s.st_ctime_ns, "ino": s.st_ino}
    return storage.file_identity(uri)


def sha256_of(storage: st.Storage, uri: str) -> str:
    h = hashlib.sha256()
    with storage.open(uri, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_identity(storage: st.Storage, uri: str, work_dir: str) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file, read only when its cache entry is missing or out of date."""
    key = _cache_key(storage, uri)
    entry_uri = st.join(work_dir, CACHE_FOLDER, hashlib.sha256(uri.encode()).hexdigest()[:32] + ".json")
    try:
        cached = storage.read_json(entry_uri) if storage.exists(entry_uri) else None
    except (OSError, ValueError):  # a damaged entry is recomputed
        cached = None
    if isinstance(cached, dict) and cached.get("uri") == uri and cached.get("key") == key and isinstance(cached.get("sha256"), str):
        return {"size": key["size"], "sha256": cached["sha256"]}
    digest = sha256_of(storage, uri)
    storage.makedirs(st.join(work_dir, CACHE_FOLDER))
    storage.write_json_atomic(entry_uri, {"uri": uri, "key": key, "sha256": digest})
    return {"size": key["size"], "sha256": digest}
