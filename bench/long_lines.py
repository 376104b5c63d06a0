"""One long JSONL record: ingest time against its size (it was quadratic: 10/30/100 MB took
2.2/7.5/66.5 s and 300 MB did not finish in 600 s).

    .venv/bin/python bench/long_lines.py --mb 10 30 100 300

Each size is one file holding a short record, one record of N MB of text and another short one,
read by the ingest stage's JSONL reader (``read_jsonl``: line splitting, UTF-8 and JSON checks,
the Arrow batch) twice: with ``max_record_bytes: null`` (the record is read) and with the default
64 MiB limit (a bigger record is quarantined as ``record_too_large`` without being held).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from pipeline.storage import Storage
    from stages.ingest.stage import SourceConfig, read_jsonl

    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, nargs="+", default=[10, 30, 100, 300])
    args = ap.parse_args()
    print("| record | limit | seconds | kept | quarantined |\n|---:|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.mb:
            path = Path(tmp) / f"long-{mb}.jsonl"
            with open(path, "w") as f:
                f.write(json.dumps({"text": "before"}) + "\n")
                f.write(json.dumps({"text": "x" * (mb * 1_000_000)}) + "\n")
                f.write(json.dumps({"text": "after"}) + "\n")
            for limit in (None, 64 << 20):
                source = SourceConfig(name="s", paths=[str(path)], max_record_bytes=limit)
                started = time.perf_counter()
                kept = quarantined = 0
                for table in read_jsonl(Storage(), str(path), path.name, source, 4096):
                    if "quarantine_reason" in table.column_names:
                        quarantined += table.num_rows
                    else:
                        kept += table.num_rows
                seconds = time.perf_counter() - started
                print(f"| {mb} MB | {'none' if limit is None else '64 MiB'} | {seconds:.2f} | {kept} | {quarantined} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
