"""Ingest: JSONL (plain, .gz, .zst), JSON arrays, Parquet and folders of them or of text files, local or s3://.

Modules by concern: :mod:`config` (sources), :mod:`listing` (which files, which format),
:mod:`decompress` (.gz/.zst streams), :mod:`records` (rows, quarantine reasons, ids),
:mod:`readers` (one per format) and :mod:`stage` (the stage: plan parts, read one, check).
Importing the package registers the stage."""

from stages.ingest.config import IngestConfig, SourceConfig
from stages.ingest.readers import read_json, read_jsonl, read_parquet, read_text_file
from stages.ingest.records import doc_id
from stages.ingest.stage import Ingest

__all__ = ["Ingest", "IngestConfig", "SourceConfig", "doc_id", "read_json", "read_jsonl", "read_parquet", "read_text_file"]
