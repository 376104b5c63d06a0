"""Compare two runs of the same pipeline file, stage by stage: are the files every manifest lists
byte-identical? Used to check that a refactor (or another lmpipe version, another machine, another
number of workers) changes no output.

    python bench/compare_outputs.py WORK_DIR_A WORK_DIR_B [--stages a,b,c]

For each stage name present in both work dirs (the newest committed output of each), every
dataset's files are compared by content (sha256), matched by their path below the attempt
folder. Stages whose outputs name their own location (train: checkpoint paths) are compared
without those columns: the checkpoint rows' steps/losses, and the evaluation rows' values.
Exit status 1 if anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import pyarrow.parquet as pq

LOCATION_COLUMNS = {"path", "checkpoint", "tokenizer_path"}  # columns that hold a path inside the run's work dir


def newest_manifest(work: str, stage: str):
    root = os.path.join(work, stage)
    best = None
    for fp in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, fp, "_manifest.json")
        if os.path.exists(path):
            with open(path) as f:
                m = json.load(f)
            if best is None or m["timings"]["started_at"] > best[1]["timings"]["started_at"]:
                best = (os.path.join(root, fp), m)
    return best


def file_digests(stage_dir: str, manifest: dict) -> dict[str, str]:
    out = {}
    for ds, info in manifest["datasets"].items():
        for f in info["files"]:
            rel = f["path"].split("/", 1)[1]  # drop attempt-<id>/
            full = os.path.join(stage_dir, f["path"])
            if rel.endswith(".parquet") and _has_location_columns(full):
                table = pq.read_table(full)
                table = table.drop_columns([c for c in table.column_names if c in LOCATION_COLUMNS])
                digest = hashlib.sha256(json.dumps(table.to_pylist(), sort_keys=True, default=str).encode()).hexdigest()
            else:
                with open(full, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            out[f"{ds}:{rel}"] = digest
    return out


def _has_location_columns(path: str) -> bool:
    return bool(LOCATION_COLUMNS & set(pq.read_schema(path).names))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--stages", help="comma-separated stage names (default: every stage in both)")
    args = ap.parse_args()
    names = args.stages.split(",") if args.stages else sorted(set(os.listdir(args.a)) & set(os.listdir(args.b)))
    differ = 0
    for name in names:
        a, b = newest_manifest(args.a, name), newest_manifest(args.b, name)
        if a is None or b is None:
            continue
        da, db = file_digests(*a), file_digests(*b)
        same = da == db
        differ += not same
        rows = {ds: (a[1]["datasets"][ds]["rows"], b[1]["datasets"].get(ds, {}).get("rows")) for ds in a[1]["datasets"]}
        print(f"{name:<16} {'identical' if same else 'DIFFERENT'}  {len(da)} files  rows {rows}")
        if not same:
            for key in sorted(set(da) | set(db)):
                if da.get(key) != db.get(key):
                    print(f"    {key}: {str(da.get(key))[:12]} vs {str(db.get(key))[:12]}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
