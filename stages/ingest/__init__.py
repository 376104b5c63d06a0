"""Ingest: JSONL (plain, .gz, .zst), Parquet and folders of text files, local or s3://.

The stage class lives in :mod:`stages.ingest.stage`; importing the package registers it."""

from stages.ingest.stage import Ingest, SourceConfig, doc_id, read_jsonl

__all__ = ["Ingest", "SourceConfig", "doc_id", "read_jsonl"]
