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


def short_list(names: list[str], limit: int = 10) -> str:
    if not names:
        return "nothing"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def source_files(storage: st.Storage, source: SourceConfig) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(file uri, path relative to its source root, format) for every file of a source, sorted; and
    the files of its folders that are skipped (format auto: no known format by name or text_glob)."""
    files: list[tuple[str, str, str]] = []
    skipped: list[str] = []
    for pattern in source.paths:
        matches = storage.glob(pattern)
        if not matches:
            raise FileNotFoundError(f"source {source.name!r}: {pattern} matches no file")
        for m in matches:
            if storage.isdir(m):
                found = [(f, _relpath(f, m)) for f in storage.find_files(m)]
                if source.format == "auto":
                    readable = [(f, rel, _folder_format(rel, source)) for f, rel in found]
                    skipped.extend(f for f, _, fmt in readable if fmt is None)
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
