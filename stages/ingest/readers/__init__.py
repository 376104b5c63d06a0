"""One reader per input format; each yields Arrow tables of rows and quarantine records."""

from stages.ingest.readers.json_file import read_json
from stages.ingest.readers.jsonl import read_jsonl
from stages.ingest.readers.parquet import read_parquet
from stages.ingest.readers.text import read_text_file

__all__ = ["read_json", "read_jsonl", "read_parquet", "read_text_file"]
