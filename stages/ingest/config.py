"""The ingest stage's typed config: its sources and how they are read."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator

from pipeline.config import PathStr, StrictModel

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_FIELD_NOTE = (" A dotted path (doc.text) reaches into nested objects (Parquet: struct columns); a top-level key"
               " that itself contains the dot wins over the nested path.")


class SourceConfig(StrictModel):
    name: str = Field(description="source name recorded in every row (e.g. 'news')")
    paths: list[PathStr] = Field(min_length=1, description="files, folders or globs; local or s3://")
    format: Literal["auto", "jsonl", "json", "parquet", "text"] = Field(
        default="auto",
        description="auto: each file by its name (.jsonl/.ndjson, .json, each optionally .gz/.zst; .parquet/.pq;"
                    " .txt/.md/.text, in folders the files matching text_glob); or one format for every file")
    text_field: str = Field(default="text", description="field holding the document text." + _FIELD_NOTE)
    url_field: Optional[str] = Field(default="url", description="field holding the URL (null: none); dotted paths as for text_field")
    metadata_fields: Optional[list[str]] = Field(
        default=None, description="fields kept in metadata (default: all others); dotted paths as for text_field, kept under that name")
    text_glob: str = Field(default="**/*.txt", description="with format auto, the files of a folder read as text (the others"
                                                           " are read by their names; files of no known format are skipped)")
    max_record_bytes: Optional[int] = Field(
        default=64 << 20, ge=1,
        description="largest JSONL line or text file read as one record (bytes); a bigger one is quarantined as"
                    " record_too_large without being held in memory (null: no limit)")
    identity: Literal["stat", "content"] = Field(
        default="stat",
        description="what says a file changed: stat (size and mtime, or the ETag on S3; cheap, but `touch` reruns the"
                    " pipeline and a same-size edit that keeps the old mtime is not seen) or content (the sha256 of"
                    " its bytes, cached per file in the work dir and read again only when the file was rewritten)")
    allow_empty: bool = Field(default=False, description="accept a source that yields no documents (no records, or every"
                                                         " record quarantined); by default that fails the stage")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.match(v):
            raise ValueError("must start with a letter or digit and hold only letters, digits, '_', '.', '-'")
        return v


class IngestConfig(StrictModel):
    sources: list[SourceConfig] = Field(min_length=1)
    max_bad_fraction: Optional[float] = Field(default=None, ge=0, le=1, description="fail if quarantined/read exceeds this")
    batch_rows: int = Field(default=4096, ge=1, description="rows per Arrow batch while reading")
    text_files_per_part: int = Field(default=1000, ge=1, description="text files read by one task")
    max_part_bytes: int = Field(
        default=64 << 20, ge=1,
        description="the most text one part holds, whatever the input's layout: an uncompressed JSONL file above it is"
                    " read by several tasks in byte ranges cut at line boundaries, a Parquet file in runs of row groups,"
                    " text files grouped up to it; a compressed stream (.gz/.zst, .json) is read by one task whose output"
                    " files roll over at it. Every later stage keeps one part per file, so its parts stay bounded too")

    @field_validator("sources")
    @classmethod
    def _unique(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        seen = set()
        for s in sources:
            if s.name in seen:
                raise ValueError(f"source name {s.name!r} appears twice")
            seen.add(s.name)
        return sources
