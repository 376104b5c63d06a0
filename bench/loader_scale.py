"""The training loader over growing corpora on S3 (moto's server on 127.0.0.1): per-rank peak RSS,
bytes fetched from S3 per byte consumed, and micro-batches/s, with W ranks as separate processes,
each reading one whole epoch. At the smallest size, the loader before issue #12 (whole shards read
on first use and kept; one global permutation) is measured the same way.

    flock /tmp/lmpipe-heavy.lock .venv/bin/python bench/loader_scale.py --sizes 0.5,1.5,5 --ranks 4

Shards have the tokenize stage's schema (``tokens`` fixed_size_list<uint16>[seq_len + 1],
``source``, ``doc_ids``, ``doc_offsets``), random tokens, record batches of ``--rows-per-batch``
rows with the ``lmpipe.rows_per_batch`` hint. Bytes are counted in each rank process at the S3
client (the ``ContentLength`` of every GetObject answer), so both loaders are measured alike.
moto reads a whole object to answer a ranged GET, so shards are kept small (``--shard-mb``): that
is the server's cost, not bytes on the wire. Everything generated is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OLD_LOADER_COMMIT = "49ac38c"  # the loader before issue #12 (reads whole shards, keeps them)
BUCKET = "loaderbench"


def shard_bytes(rows: int, seq_len: int, rows_per_batch: int, seed: int) -> tuple[bytes, int]:
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    width = seq_len + 1
    tokens = rng.integers(0, 50_000, size=rows * width, dtype=np.uint16)
    doc = np.arange(rows, dtype=np.int64) + seed * 1_000_000
    table = pa.table({
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens), width),
        "source": pa.array(["news"] * rows),
        "doc_ids": pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), pa.array(doc)),
        "doc_offsets": pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), pa.array(np.zeros(rows, np.int32))),
    }).replace_schema_metadata({b"lmpipe.rows_per_batch": str(rows_per_batch).encode()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=rows_per_batch)
    return sink.getvalue().to_pybytes(), rows


def storage_options(endpoint: str) -> dict:
    return {"s3": {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}}


def upload(endpoint: str, prefix: str, total_bytes: float, args) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.storage import Storage

    fs = Storage(storage_options(endpoint)).fs("s3://x")
    row_bytes = 2 * (args.seq_len + 1)
    rows_per_shard = max(args.rows_per_batch, int(args.shard_mb * 2**20 / row_bytes) // args.rows_per_batch * args.rows_per_batch)
    n_shards = max(1, round(total_bytes / (rows_per_shard * row_bytes)))
    uris = [f"s3://{BUCKET}/{prefix}/part-{i:05d}.arrow" for i in range(n_shards)]

    def put(i: int) -> int:
        data, _ = shard_bytes(rows_per_shard, args.seq_len, args.rows_per_batch, seed=i)
        fs.pipe_file(uris[i].split("://", 1)[1], data)
        return len(data)

    with ThreadPoolExecutor(2) as pool:
        written = sum(pool.map(put, range(n_shards)))
    print(f"  {n_shards} shards of {rows_per_shard} rows, {written / 1e9:.2f} GB uploaded", flush=True)
    return uris


def worker(spec: dict) -> dict:
    """One rank: read one epoch, report RSS, bytes and speed."""
    import resource

    import aiobotocore.client as aioclient

    fetched = [0, 0]  # bytes, requests
    original = aioclient.AioBaseClient._make_api_call

    async def counting(self, operation, params):
        out = await original(self, operation, params)
        if operation == "GetObject":
            fetched[0] += int(out.get("ContentLength") or 0)
            fetched[1] += 1
        return out

    aioclient.AioBaseClient._make_api_call = counting

    import torch  # noqa: F401  (a training process has it; its RSS is part of the baseline)

    from pipeline.storage import Storage

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    storage = Storage(storage_options(spec["endpoint"]))
    torch.set_num_threads(1)
    baseline = rss_mb()
    t0 = time.perf_counter()
    if spec["old"]:
        import importlib.util

        loaded = importlib.util.spec_from_file_location("old_loader", spec["old"])
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        loader = module.TokenShardLoader(spec["files"], spec["mb"], rank=spec["rank"], world_size=spec["world"], seed=0,
                                         storage=storage, loop=False)
    else:
        from stages.tokenize.loader import TokenShardLoader

        loader = TokenShardLoader(spec["files"], spec["mb"], rank=spec["rank"], world_size=spec["world"], seed=0,
                                  storage=storage, loop=False, cache_bytes=spec["cache_mb"] << 20)
    init_s = time.perf_counter() - t0
    init_bytes = fetched[0]
    t0 = time.perf_counter()
    batches = 0
    for x, _ in loader:
        batches += 1
    seconds = time.perf_counter() - t0
    consumed = batches * spec["mb"] * (x.shape[1] + 1) * 2  # uint16 tokens on disk
    return {"rank": spec["rank"], "batches": batches, "seconds": seconds, "batches_per_s": batches / seconds,
            "init_s": init_s, "init_bytes": init_bytes, "bytes_fetched": fetched[0], "get_requests": fetched[1],
            "bytes_consumed": consumed, "fetched_per_consumed": fetched[0] / consumed,
            "rss_baseline_mb": baseline, "rss_peak_mb": rss_mb()}


def run_ranks(endpoint: str, files: list[str], args, old: str = "") -> list[dict]:
    procs = []
    for rank in range(args.ranks):
        spec = {"endpoint": endpoint, "files": files, "rank": rank, "world": args.ranks, "mb": args.micro_batch,
                "cache_mb": args.cache_mb, "old": old}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"a rank failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def summary(label: str, size_gb: float, ranks: list[dict]) -> dict:
    fetched = sum(r["bytes_fetched"] for r in ranks)
    consumed = sum(r["bytes_consumed"] for r in ranks)
    return {"loader": label, "corpus_gb": size_gb, "ranks": len(ranks),
            "rss_peak_mb_max": max(r["rss_peak_mb"] for r in ranks),
            "rss_above_baseline_mb_max": max(r["rss_peak_mb"] - r["rss_baseline_mb"] for r in ranks),
            "fetched_per_consumed": fetched / consumed, "fetched_gb": fetched / 1e9, "consumed_gb": consumed / 1e9,
            "batches_per_s_per_rank": min(r["batches_per_s"] for r in ranks), "init_s_max": max(r["init_s"] for r in ranks),
            "init_bytes_max": max(r["init_bytes"] for r in ranks), "per_rank": ranks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--sizes", default="0.5,1.5,5", help="corpus sizes in GB")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rows-per-batch", type=int, default=256)
    ap.add_argument("--shard-mb", type=float, default=8)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--cache-mb", type=int, default=512)
    ap.add_argument("--no-old", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench/results/loader_scale.json"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    sys.path.insert(0, str(REPO))
    from tests.conftest import free_port

    sizes = [float(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="loader-scale-"))
    free = shutil.disk_usage(work).free / 1e9
    if free < max(sizes) * 1.5 + 2:
        raise SystemExit(f"{work}: {free:.1f} GB free, need {max(sizes) * 1.5 + 2:.1f}")
    old_path = work / "old_loader.py"
    old_path.write_text(subprocess.run(["git", "show", f"{OLD_LOADER_COMMIT}:stages/tokenize/loader.py"], cwd=REPO,
                                       capture_output=True, text=True, check=True).stdout)
    results = []
    try:
        for k, size in enumerate(sizes):
            port = free_port()
            endpoint = f"http://127.0.0.1:{port}"
            env = {**os.environ, "TMPDIR": str(work), "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(1 << 20)}
            server = subprocess.Popen([str(REPO / ".venv/bin/moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                      stdout=open(work / f"moto-{k}.log", "w"), stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
            try:
                import boto3

                for _ in range(100):
                    try:
                        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
                        break
                    except Exception:
                        time.sleep(0.2)
                print(f"{size} GB:", flush=True)
                files = upload(endpoint, f"c{k}", size * 1e9, args)
                row = summary("new", size, run_ranks(endpoint, files, args))
                results.append(row)
                print(f"  new: rss peak {row['rss_peak_mb_max']:.0f} MB (+{row['rss_above_baseline_mb_max']:.0f} over imports), "
                      f"fetched/consumed {row['fetched_per_consumed']:.3f}, {row['batches_per_s_per_rank']:.1f} batches/s/rank", flush=True)
                if k == 0 and not args.no_old:
                    row = summary("old", size, run_ranks(endpoint, files, args, old=str(old_path)))
                    results.append(row)
                    print(f"  old: rss peak {row['rss_peak_mb_max']:.0f} MB (+{row['rss_above_baseline_mb_max']:.0f}), "
                          f"fetched/consumed {row['fetched_per_consumed']:.3f}, {row['batches_per_s_per_rank']:.1f} batches/s/rank", flush=True)
            finally:
                os.killpg(server.pid, 15)
                server.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
