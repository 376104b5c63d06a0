"""Ingest: JSONL (plain, .gz, .zst), JSON arrays, Parquet and folders of them or of text files, local or s3://.

The stage class lives in :mod:`stages.ingest.stage`; importing the package registers it."""

from stages.ingest.stage import Ingest, SourceConfig, doc_id, read_json, read_jsonl

__all__ = ["Ingest", "SourceConfig", "doc_id", "read_json", "read_jsonl"]
