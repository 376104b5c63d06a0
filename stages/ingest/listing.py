"""Which files a source names, and the format each is read as (by name, by ``text_glob``, or as set)."""

from __future__ import annotations

import fnmatch
import os
import posixpath
from typing import Optional

from pipeline import storage as st
from stages.ingest.config import SourceConfig

_COMPRESSIONS = ("", ".gz", ".zst")
JSONL_SUFFIXES = tuple(s + c for s in (".jsonl", ".ndjson") for c in _COMPRESSIONS)
JSON_SUFFIXES = tuple(".json" + c for c in _COMPRESSIONS)
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".txt", ".md", ".text")


def _glob_base(pattern: str) -> str:
    """The folder part of a pattern before its first wildcard: relative paths are taken from it."""
    parts = pattern.split("/")
    for i, p in enumerate(parts):
        if any(ch in p for ch in "*?["):
            return "/".join(parts[:i])
    return posixpath.dirname(pattern.rstrip("/")) if "://" in pattern else os.path.dirname(pattern.rstrip("/"))


def _relpath(uri: str, base: str) -> str:
    base = base.rstrip("/")
    if base and uri.startswith(base + "/"):
        return uri[len(base) + 1 :]
    return uri.rsplit("/", 1)[-1]


def format_of(name: str) -> Optional[str]:
    """The format a file's name says (jsonl, json, parquet, text), None when it says none."""
    low = name.lower()
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if low.endswith(JSON_SUFFIXES):
        return "json"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def detect_format(uri: str) -> str:
    fmt = format_of(uri)
    if fmt is None:
        raise ValueError(f"{uri}: cannot tell the format from the name; set format: jsonl|json|parquet|text on the source")
    return fmt


def _folder_format(rel: str, source: SourceConfig) -> Optional[str]:
    """With format auto, how a file found in a folder is read: data formats by name, text by text_glob."""
    fmt = format_of(rel)
    if fmt in ("jsonl", "json", "parquet"):
        return fmt
    return "text" if _matches_text_glob(rel, source.text_glob) else None


NO_KNOWN_FORMAT = "no known format by its name or text_glob (set text_glob or format: on the source to read it)"


def short_list(names: list[str], limit: int = 10) -> str:
    if not names:
        return "nothing"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def folder_files(storage: st.Storage, folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Every file below ``folder``, sorted, and the entries passed over with the reason why.

    A symlink to a folder is followed (its files are named by their path through the link); one
    that leads back to a folder being walked (a loop), or to a folder already read through
    another path (its files would be read twice), is passed over, as is a broken link or anything
    that is neither a file nor a folder. Object stores have no links: their listing is used as is.
    """
    if st.is_remote(folder):
        return storage.find_files(folder), []
    root = folder[len("file://"):] if folder.startswith("file://") else folder
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    walked: dict[str, str] = {}  # real path of each folder walked -> the path it was reached by

    def walk(path: str, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(path)
        if real in ancestors:
            skipped.append((path, f"a symlink back to {real}, a folder above it (a loop): not followed"))
            return
        if real in walked:
            skipped.append((path, f"a symlink to {real}, already read as {walked[real]}: not read twice"))
            return
        walked[real] = path
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                walk(entry.path, ancestors | {real})
            elif entry.is_file(follow_symlinks=True):
                files.append(entry.path)
            elif entry.is_symlink():
                skipped.append((entry.path, f"a broken symlink (to {os.readlink(entry.path)}): nothing to read"))
            else:
                skipped.append((entry.path, "neither a file nor a folder (a socket, a pipe, a device)"))

    walk(root.rstrip("/") or "/", frozenset())
    return sorted(files), skipped


def source_files(storage: st.Storage, source: SourceConfig) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(file uri, path relative to its source root, format) for every file of a source, sorted; and
    what its folders hold that is not read, with the reason (format auto: no known format by name
    or text_glob; a symlink loop, a broken link -- see :func:`folder_files`)."""
    files: list[tuple[str, str, str]] = []
    skipped: list[tuple[str, str]] = []
    for pattern in source.paths:
        matches = storage.glob(pattern)
        if not matches:
            bucket = storage.missing_bucket(pattern)
            why = f": the bucket {bucket!r} does not exist" if bucket else " matches no file"
            raise FileNotFoundError(f"source {source.name!r}: {pattern}{why}")
        for m in matches:
            if storage.isdir(m):
                found_files, passed_over = folder_files(storage, m)
                skipped.extend(passed_over)
                found = [(f, _relpath(f, m)) for f in found_files]
                if source.format == "auto":
                    readable = [(f, rel, _folder_format(rel, source)) for f, rel in found]
                    skipped.extend((f, NO_KNOWN_FORMAT) for f, _, fmt in readable if fmt is None)
                    readable = [r for r in readable if r[2] is not None]
                else:
                    readable = [(f, rel, source.format) for f, rel in found]
                if not readable:
                    raise ValueError(
                        f"source {source.name!r}: folder {m} holds no readable files (found: {short_list([rel for _, rel in found])});"
                        f" name them .jsonl/.ndjson/.json (optionally .gz/.zst) or .parquet, match text_glob"
                        f" ({source.text_glob!r}) for text, or set format: on the source"
                    )
                files.extend(readable)
            else:
                try:
                    fmt = source.format if source.format != "auto" else detect_format(m)
                except ValueError as e:
                    raise ValueError(f"source {source.name!r}: {e}") from None
                files.append((m, _relpath(m, _glob_base(pattern)), fmt))
    seen: set[str] = set()
    unique = []
    for f, rel, fmt in files:
        if f not in seen:
            seen.add(f)
            unique.append((f, rel, fmt))
    return sorted(unique), skipped


def expand_source(storage: st.Storage, source: SourceConfig) -> list[tuple[str, str, str]]:
    """(file uri, path relative to its source root, format) for every file of a source, sorted."""
    return source_files(storage, source)[0]


def _matches_text_glob(rel: str, pattern: str) -> bool:
    if pattern.startswith("**/"):
        return fnmatch.fnmatch(rel, pattern[3:]) or fnmatch.fnmatch(rel, pattern)
    return fnmatch.fnmatch(rel, pattern)
