"""End-to-end minhash_dedup through the Runner on local Ray: docs/s and driver peak memory.

    .venv/bin/python bench/dedup_scale.py --docs 10000 --cpus 2   # corpora kept in --root (default /tmp/dedup-scale)

Documents: real news articles, each copied with random word edits (so ~1/3 are near-duplicates),
in 8 JSONL files; ingest bounds its parts (``max_part_bytes``), and the stage's first pass (nodes and
keys) runs one task per file ingest wrote (``first_pass_tasks``). The 1-minute load average is
recorded before and after: on a shared machine a number means little without it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LMPIPE_PROGRESS", "0")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")


def corpus(folder: Path, n: int, shards: int = 8) -> None:
    from stages.assets import news_articles

    rng = random.Random(5)
    base = [a["text"] for a in news_articles() if len(a["text"].split()) >= 50]
    folder.mkdir(parents=True, exist_ok=True)
    files = [open(folder / f"s-{k:03d}.jsonl", "w") for k in range(shards)]
    for i in range(n):
        words = base[i % len(base)].split()
        for _ in range(max(1, len(words) // (20 if i % 3 else 200))):
            words[rng.randrange(len(words))] = f"w{rng.randrange(10**6)}"
        files[i % shards].write(json.dumps({"text": " ".join(words)}) + "\n")
    for f in files:
        f.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=None, help="shuffle partitions (default: the stage's, from input size)")
    ap.add_argument("--root", default="/tmp/dedup-scale", help="corpora are kept here per size (1M documents: 3 GB, ~6 min to"
                                                               " write); each run's work dir is made and removed below it")
    args = ap.parse_args()
    root = Path(args.root)
    data = root / f"docs-{args.docs}"
    t0 = time.perf_counter()
    if not (data / ".done").exists():
        shutil.rmtree(data, ignore_errors=True)
        corpus(data, args.docs)
        (data / ".done").write_text("")
    corpus_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    try:
        run(tmp, data, corpus_s, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # 1M documents: ~3 GB of work dir


def run(tmp: Path, data: Path, corpus_s: float, args) -> None:
    from pipeline import local_ray
    from pipeline.config import load_config
    from pipeline.runner import Runner

    load_before = os.getloadavg()[0]
    for attempt in range(3):  # on a loaded machine Ray's start can time out: not the benchmark's failure
        try:
            local_ray.start(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"# Ray's start timed out (load {os.getloadavg()[0]:.1f}); again", flush=True)
    (tmp / "p.yaml").write_text(f"""
name: scale
work_dir: {tmp}/work
mlflow: {{tracking_uri: "sqlite:///{tmp}/mlflow.db"}}
stages:
  ingest: {{uses: ingest, config: {{sources: [{{name: news, paths: ["{data}/*.jsonl"]}}]}}}}
  minhash_dedup: {{uses: minhash_dedup, inputs: [ingest], config: {{num_partitions: {json.dumps(args.partitions)}}}}}
""")
    report = Runner(load_config(tmp / "p.yaml")).run()
    m = report.stage("minhash_dedup").manifest
    ingest = report.stage("ingest").manifest
    wall = m["timings"]["wall_seconds"]
    dedup = m["summary"]["data"]  # DedupSummary
    print(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_1m_before": round(load_before, 2),
        "load_1m_after": round(os.getloadavg()[0], 2), "first_pass_tasks": len(ingest["datasets"]["data"]["files"]),
        "corpus_s": round(corpus_s, 1),  # 0 when the corpus was kept from an earlier run
 "ingest_wall_s": ingest["timings"]["wall_seconds"],
        "docs": args.docs, "cpus": args.cpus, "wall_s": wall, "docs_per_s": round(args.docs / wall),
        "removed": dedup["removed"], "edges": dedup["edges"], "partitions": dedup["partitions"], "rounds": dedup["rounds"],
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "workers_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    main()
