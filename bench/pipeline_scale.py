"""How the demo's data stages scale: per stage wall time, documents in/out, bytes read/written on S3,
driver peak RSS and the largest Ray worker's peak RSS, on N copies of the demo corpus with work_dir on
the moto S3 server, on a local Ray of ``--cpus`` CPUs (several values: the 1-vs-2-worker speedup).

    flock /tmp/lmpipe-heavy.lock .venv/bin/python bench/pipeline_scale.py --copies 1 2 4 8 --cpus 2
    flock /tmp/lmpipe-heavy.lock .venv/bin/python bench/pipeline_scale.py --copies 1 2 4 8 --cpus 1 2 --speedup-at 4

Stages: those of examples/demo.yaml before train (ingest, the four filters, exact and MinHash dedup,
decontaminate, train_tokenizer, tokenize), with the demo's configs; only sources, work_dir, MLflow
(a local sqlite file) and the S3 endpoint are replaced. Run ``lmpipe fetch-demo-data`` first.

Corpus: copy 0 is data/demo as it is. In copy c > 0 every document has adjacent words swapped at
seeded positions (about one swap per five words, within lines; the seed is (c, the text), so the
corpus's real duplicates stay duplicates within a copy) and news URLs get ``?lmpipe_copy=c``.
Exact copies would not do: exact_dedup (text and URL keys) would drop every copy but one, and
MinHash (5-word shingles, threshold 0.8) would drop copies with a small prefix; with the swaps almost
every 5-word shingle of a copy is new (measured at 8 copies: exact_dedup removes 38 of 9,766 documents,
MinHash 1), while words, lines, lengths and language stay those of real text. The filters keep ~15%
fewer of a perturbed copy (10,696 of 31,624 at 8 copies vs 1,578 of 3,953 at 1: a swap can move a
line's final punctuation inward, which C4's and FineWeb's line rules count). Decontamination finds
fewer MMLU 13-grams in perturbed copies (the swaps break them).

``--layout one-file`` writes the same corpus with each source in one uncompressed JSONL file
(news: every copy's articles; python_docs and shakespeare: one record per text file), the layout
of a corpus that comes as a few huge files, and ``--max-part-bytes`` sets ingest's part bound:

    flock /tmp/lmpipe-heavy.lock .venv/bin/python bench/pipeline_scale.py --layout one-file --copies 1 8 --max-part-bytes 4194304

Each stage runs in its own measured process (``Runner.run(only=stage)``: upstream from the cache,
this stage recomputed), so driver peak RSS (ru_maxrss), worker peak RSS (every ``ray::`` process
below the driver, sampled every 0.2 s) and S3 bytes (counted by a TCP proxy in front of moto: bodies
and headers) belong to that stage alone. ``wall_s`` is the stage's own wall time from its manifest;
``worker_s`` is the sum of its parts' seconds (stages that fan out, dedup and tokenize, do most work
outside parts); ``worker_cpu_s`` the CPU seconds of every Ray worker while the stage ran, and
``driver_cpu_s`` the driver's (serial work: planning, manifests, MLflow).
``uptime``'s 1-minute load average is recorded before and after each stage.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import WorkerPeakRss, driver_peak_rss, moto_behind_proxy, own_cpu_seconds  # noqa: E402

BUCKET = "pipescale"
DATA_STAGES = ["ingest", "language_filter", "quality_filter", "toxicity_filter", "pii_masker", "exact_dedup",
               "minhash_dedup", "decontaminate", "train_tokenizer", "tokenize"]
SWAP_PROBABILITY = 0.25  # per word position (a swapped pair is skipped): ~1 swap per 5 words


def perturb(text: str, copy: int) -> str:
    """Swap adjacent words at seeded positions, line by line (copy 0: the text unchanged)."""
    if copy == 0:
        return text
    rng = random.Random(hashlib.blake2b(f"{copy}\0{text}".encode(), digest_size=8).digest())
    lines = []
    for line in text.split("\n"):
        words = line.split(" ")
        i = 0
        while i < len(words) - 1:
            if rng.random() < SWAP_PROBABILITY:
                words[i], words[i + 1] = words[i + 1], words[i]
                i += 2
            else:
                i += 1
        lines.append(" ".join(words))
    return "\n".join(lines)


def with_copy(url: str, copy: int) -> str:
    if copy == 0 or not url:
        return url
    return f"{url}{'&' if '?' in url else '?'}lmpipe_copy={copy}"


def make_corpus(demo: Path, out: Path, copies: int) -> dict:
    """``copies`` copies of the demo corpus under ``out`` (kept between runs; one folder per copy)."""
    import zstandard

    info = {"copies": copies, "chars": 0, "documents": 0}
    for c in range(copies):
        done = out / f".copy-{c:03d}.json"
        if not done.exists():
            news = out / "news"
            news.mkdir(parents=True, exist_ok=True)
            chars = docs = 0
            for shard in sorted((demo / "news").glob("*.jsonl.zst")):
                lines = zstandard.ZstdDecompressor().stream_reader(shard.read_bytes()).read().decode().splitlines()
                buf = io.StringIO()
                for line in lines:
                    rec = json.loads(line)
                    rec["text"] = perturb(rec.get("text") or "", c)
                    rec["url"] = with_copy(rec.get("url") or "", c)
                    chars += len(rec["text"])
                    docs += 1
                    buf.write(json.dumps(rec, ensure_ascii=False) + "\n")
                target = news / f"{shard.name.split('.')[0]}-c{c:03d}.jsonl.zst"
                tmp = target.with_suffix(".tmp")
                tmp.write_bytes(zstandard.ZstdCompressor(level=3).compress(buf.getvalue().encode()))
                tmp.replace(target)
            for source in ("python_docs", "shakespeare"):
                dest = out / source / f"copy-{c:03d}"
                if dest.exists():
                    shutil.rmtree(dest)
                for f in sorted((demo / source).rglob("*.txt")):
                    text = perturb(f.read_text(encoding="utf-8"), c)
                    target = dest / f.relative_to(demo / source)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text, encoding="utf-8")
                    chars += len(text)
                    docs += 1
            done.write_text(json.dumps({"chars": chars, "documents": docs}))
        d = json.loads(done.read_text())
        info["chars"] += d["chars"]
        info["documents"] += d["documents"]
    return info


ONE_FILE_SOURCES = ("news", "python_docs", "shakespeare")


def make_one_file_corpus(corpus: Path, out: Path, copies: int) -> dict[str, Path]:
    """Each source of ``copies`` copies of the (many-file) corpus as one uncompressed JSONL file."""
    import zstandard

    out.mkdir(parents=True, exist_ok=True)
    files = {s: out / f"{s}-x{copies}.jsonl" for s in ONE_FILE_SOURCES}
    if all(f.exists() for f in files.values()):
        return files
    for source, target in files.items():
        tmp = target.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as w:
            for c in range(copies):
                if source == "news":
                    for shard in sorted((corpus / "news").glob(f"*-c{c:03d}.jsonl.zst")):
                        w.write(zstandard.ZstdDecompressor().stream_reader(shard.read_bytes()).read().decode())
                else:
                    folder = corpus / source / f"copy-{c:03d}"
                    for f in sorted(folder.rglob("*.txt")):
                        w.write(json.dumps({"text": f.read_text(encoding="utf-8"), "path": str(f.relative_to(folder))},
                                           ensure_ascii=False) + "\n")
        tmp.replace(target)
    return files


def pipeline_yaml(corpus: Path, copies: int, name: str, local: Path, endpoint: str,
                  one_file: dict[str, Path] | None = None, max_part_bytes: int | None = None) -> str:
    """examples/demo.yaml's data stages with this run's sources, work_dir, MLflow and S3 endpoint."""
    import yaml

    demo = yaml.safe_load((REPO / "examples/demo.yaml").read_text())
    stages = {k: v for k, v in demo["stages"].items() if k in DATA_STAGES}
    if list(stages) != DATA_STAGES:
        raise SystemExit(f"examples/demo.yaml: expected data stages {DATA_STAGES}, found {list(stages)}")
    for src in stages["ingest"]["config"]["sources"]:
        if one_file is not None:
            src["paths"] = [str(one_file[src["name"]])]
            src.pop("format", None)  # read by its name: JSONL
        elif src["name"] == "news":
            src["paths"] = [str(corpus / "news" / f"*-c{c:03d}.jsonl.zst") for c in range(copies)]
        else:
            src["paths"] = [str(corpus / src["name"] / f"copy-{c:03d}") for c in range(copies)]
    if max_part_bytes is not None:
        stages["ingest"]["config"]["max_part_bytes"] = max_part_bytes
    doc = {
        "name": f"pipeline-scale-{copies}",
        "work_dir": f"s3://{BUCKET}/{name}",
        "seed": demo["seed"],
        "mlflow": {"tracking_uri": f"sqlite:///{local}/mlflow.db"},
        "storage": {"s3": {"endpoint_url": endpoint, "key": "${AWS_ACCESS_KEY_ID}", "secret": "${AWS_SECRET_ACCESS_KEY}"}},
        "stages": stages,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def measure(yaml_path: str, stage: str, cpus: int) -> None:
    """The measured process: recompute one stage (upstream cached); print its numbers as JSON."""
    import ray

    from pipeline.config import load_config
    from pipeline.runner import Runner

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=1 << 30)
    baseline = driver_peak_rss()
    runner = Runner(load_config(yaml_path))
    spy = None
    if os.environ.get("PIPELINE_SCALE_PROFILE"):  # py-spy over the driver and every process below it (the workers)
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()), "--subprocesses",
                                "--nonblocking", "--rate", "50", "--format", "raw", "--output", os.environ["PIPELINE_SCALE_PROFILE"]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach before the stage starts
    t, cpu0 = time.perf_counter(), own_cpu_seconds()
    with WorkerPeakRss() as workers:
        report = runner.run(only=stage)
    run_s, driver_cpu_s = time.perf_counter() - t, own_cpu_seconds() - cpu0 - workers.own_cpu_seconds
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=120)
    st = report.stage(stage)
    m = st.manifest
    c = m["counts"]
    print("RESULT " + json.dumps({
        "cached": st.cached, "wall_s": m["timings"]["wall_seconds"], "worker_s": m["timings"]["worker_seconds"],
        "run_s": round(run_s, 2), "parts": m.get("parts"), "worker_cpu_s": round(workers.cpu_seconds, 2),
        "driver_cpu_s": round(driver_cpu_s, 2),
        # the stage's own phase timings where it reports them (tokenize: score/encode/pack/write)
        "phases": ((m.get("summary") or {}).get("data") or {}).get("timings") if isinstance((m.get("summary") or {}).get("data"), dict) else None,
        "docs_in": c["rows_in"], "docs_out": c["kept"], "rejected": sum(c["rejected"].values()),
        "quarantined": sum(c["quarantined"].values()), "counts_unit": m.get("counts_unit"),
        "bytes_out": sum(ds["bytes"] for ds in m["datasets"].values()),
        "driver_peak_rss": driver_peak_rss(), "driver_rss_after_ray_init": baseline, "worker_peak_rss": workers.peak,
        "worker_peak_private": workers.peak_private,
    }), flush=True)
    ray.shutdown()


PROFILE_CATEGORIES = [  # the first that matches a stack names it
    ("import (module loading)", ("<frozen importlib",)),
    ("ray: load function/actor", ("function_manager.py",)),
    ("S3 I/O (s3fs/botocore)", ("s3fs/", "aiobotocore/", "botocore/", "fsspec/")),
    ("mlflow", ("mlflow/",)),
    ("stage code (stages/)", ("(stages/",)),
    ("runner (pipeline/)", ("(pipeline/",)),
    ("ray data", ("ray/data/",)),
    ("ray other", ("ray/",)),
]


def profile_summary(path: Path, top: int = 10) -> dict:
    """py-spy's raw (collapsed) stacks -> samples (50 = one busy CPU second of Python) per process,
    per category of work, and the lmpipe functions (innermost frame in stages/ or pipeline/) most
    samples fell in."""
    per_process: dict[str, int] = {}
    per_category: dict[str, int] = {}
    lmpipe_frames: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]  # driver;raylet;worker: the innermost is the sampled one
        if len(procs) <= 1:
            proc = "driver"
        else:
            cmd = procs[-1].split(":", 1)[-1].strip('"')
            proc = "worker" if (cmd.startswith("ray::") and "Dashboard" not in cmd) or "default_worker.py" in cmd else cmd.split(" ")[0].rsplit("/", 1)[-1]
        per_process[proc] = per_process.get(proc, 0) + n
        total += n
        code = [f for f in frames if not (f.startswith("thread ") or f.startswith("process "))]
        category = next((name for name, keys in PROFILE_CATEGORIES if any(k in f for f in code for k in keys)), "other")
        key = f"{proc}: {category}"
        per_category[key] = per_category.get(key, 0) + n
        own = [f for f in code if "(stages/" in f or "(pipeline/" in f]
        if own:
            lmpipe_frames[f"{proc}: {own[-1]}"] = lmpipe_frames.get(f"{proc}: {own[-1]}", 0) + n

    def ranked(d: dict[str, int], k: int) -> list:
        return [[name, n, round(n / max(total, 1), 3)] for name, n in sorted(d.items(), key=lambda kv: -kv[1])[:k]]

    return {"samples": total, "per_process": {a: b for a, b, _ in ranked(per_process, 8)},
            "per_category": ranked(per_category, 12), "lmpipe_functions": ranked(lmpipe_frames, top)}


def run_stage(yaml_path: Path, stage: str, cpus: int, proxy, env: dict, profile: Path | None = None) -> dict:
    load_before = os.getloadavg()
    if profile is not None:
        env = {**env, "PIPELINE_SCALE_PROFILE": str(profile)}
    down0, up0 = proxy.down, proxy.up
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--measure", str(yaml_path), stage, str(cpus)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{stage} ({yaml_path}) failed:\n{out.stderr[-4000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    r.update(stage=stage, cpus=cpus, process_s=round(time.perf_counter() - t, 1), s3_read=proxy.down - down0,
             s3_written=proxy.up - up0, load_before=[round(x, 2) for x in load_before],
             load_after=[round(x, 2) for x in os.getloadavg()])
    if profile is not None and profile.exists():
        r["profile"] = profile_summary(profile)
    return r


def mib(b: int) -> str:
    return f"{b / 2**20:,.0f}"


def table(results: list[dict]) -> str:
    rows = ["| copies | CPUs | stage | parts | wall s | worker CPU s | driver CPU s | docs in | docs out | S3 read MiB | S3 written MiB | driver peak MiB | worker peak RSS / private MiB | load 1m before/after |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {r['copies']} | {r['cpus']} | {r['stage']} | {r.get('parts') or '-'} | {r['wall_s']:.1f} | {r['worker_cpu_s']:.1f} | {r['driver_cpu_s']:.1f} | {r['docs_in']:,} |"
                    f" {r['docs_out']:,} | {r['s3_read'] / 2**20:,.1f} | {r['s3_written'] / 2**20:,.1f} | {mib(r['driver_peak_rss'])} |"
                    f" {mib(r['worker_peak_rss'])} / {mib(r['worker_peak_private']) if 'worker_peak_private' in r else '-'} |"
                    f" {r['load_before'][0]:.2f} / {r['load_after'][0]:.2f} |")
    return "\n".join(rows)


def scaling_table(results: list[dict], predict_at: int = 100) -> str:
    """Per stage (at the most CPUs): wall time, S3 reads and peak memory per size; the cost of one
    more copy at the smallest and at the largest step (larger at the largest: faster than linear);
    and wall time at ``predict_at`` copies from a least-squares fit wall = fixed + per_copy * copies
    (fixed: start-up that does not grow)."""
    import numpy as np

    cpus = max(r["cpus"] for r in results)
    by_stage: dict[str, dict[int, dict]] = {}
    for r in results:
        if r["cpus"] == cpus:
            by_stage.setdefault(r["stage"], {})[r["copies"]] = r
    sizes = sorted({c for runs in by_stage.values() for c in runs})
    head = " / ".join(f"{c}x" for c in sizes)
    rows = [f"| stage | wall s at {head} | s per copy, first / last step | fit: fixed s + s per copy | predicted wall at {predict_at}x |"
            f" S3 read MiB at {head} | worker peak RSS MiB at {head} | driver peak MiB at {head} |",
            "|---|---|---|---|---:|---|---|---|"]
    for stage, runs in by_stage.items():
        n = sorted(runs)
        if len(n) < 2:
            continue
        wall = [runs[c]["wall_s"] for c in n]
        first = (wall[1] - wall[0]) / (n[1] - n[0])
        last = (wall[-1] - wall[-2]) / (n[-1] - n[-2])
        per_copy, fixed = (float(x) for x in np.polyfit(n, wall, 1))
        rows.append(f"| {stage} | {' / '.join(f'{w:.1f}' for w in wall)} | {first:.2f} / {last:.2f} | {fixed:.1f} + {per_copy:.2f} |"
                    f" {fixed + per_copy * predict_at:,.0f} s |"
                    f" {' / '.join(format(runs[c]['s3_read'] / 2**20, ',.1f') for c in n)} |"
                    f" {' / '.join(mib(runs[c]['worker_peak_rss']) for c in n)} | {' / '.join(mib(runs[c]['driver_peak_rss']) for c in n)} |")
    return "\n".join(rows)


def speedup_table(results: list[dict]) -> str:
    """Per stage at a size measured with several CPU counts: wall time at each, and fewest / most."""
    by_key: dict[tuple[int, str], dict[int, dict]] = {}
    for r in results:
        by_key.setdefault((r["copies"], r["stage"]), {})[r["cpus"]] = r
    rows = ["| copies | stage | CPUs | wall s | worker CPU s | driver CPU s | speedup |", "|---:|---|---|---|---|---|---:|"]
    for (copies, stage), runs in by_key.items():
        if len(runs) < 2:
            continue
        cpus = sorted(runs)

        def each(key: str) -> str:
            return " / ".join(f"{runs[c][key]:.1f}" for c in cpus)

        rows.append(f"| {copies} | {stage} | {' / '.join(map(str, cpus))} | {each('wall_s')} | {each('worker_cpu_s')} |"
                    f" {each('driver_cpu_s')} | {runs[cpus[0]]['wall_s'] / runs[cpus[-1]]['wall_s']:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--cpus", type=int, nargs="+", default=[2], help="Ray CPUs; several: each stage runs with each")
    ap.add_argument("--speedup-at", type=int, help="run every --cpus value only at this many copies (the others: the largest)")
    ap.add_argument("--stages", nargs="+", default=DATA_STAGES, help="measure these (the others run unmeasured first)")
    ap.add_argument("--demo", default=str(REPO / "data/demo"))
    ap.add_argument("--root", default="/tmp/pipescale")
    ap.add_argument("--out", default=str(REPO / "bench/results/pipeline_scale.json"))
    ap.add_argument("--layout", choices=["many-files", "one-file"], default="many-files",
                    help="many-files: the demo's shards and folders per copy; one-file: each source in one JSONL file")
    ap.add_argument("--max-part-bytes", type=int, help="ingest's max_part_bytes (default: the stage's)")
    ap.add_argument("--profile", action="store_true", help="py-spy every measured stage (slows it; numbers are for where time goes)")
    ap.add_argument("--report", help="print the tables of a results JSON and exit")
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1], int(args.measure[2]))
        return
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(table(results), scaling_table(results), speedup_table(results), sep="\n\n")
        return
    bad = [s for s in args.stages if s not in DATA_STAGES]
    if bad:
        raise SystemExit(f"--stages: unknown {bad}; choose from {DATA_STAGES}")
    demo = Path(args.demo)
    if not (demo / "news").is_dir():
        raise SystemExit(f"{demo}: no demo corpus; run `.venv/bin/lmpipe fetch-demo-data` first")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "LMPIPE_PROGRESS": "0", "RAY_DATA_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    os.environ.update(env)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out)
    results: list[dict] = []
    with moto_behind_proxy(root / "moto.log", [BUCKET]) as (endpoint, proxy):
        import boto3

        for copies in args.copies:
            corpus = make_corpus(demo, root / "corpus", copies)
            name = f"n{copies}-{int(time.time())}"
            local = root / name
            local.mkdir()
            yaml_path = local / "pipeline.yaml"
            one_file = make_one_file_corpus(root / "corpus", root / "one-file", copies) if args.layout == "one-file" else None
            yaml_path.write_text(pipeline_yaml(root / "corpus", copies, name, local, endpoint, one_file, args.max_part_bytes))
            print(f"# {copies} copies: {corpus['documents']:,} documents, {corpus['chars'] / 1e6:.0f} M chars", flush=True)
            last = max(DATA_STAGES.index(s) for s in args.stages)
            for stage in DATA_STAGES[: last + 1]:  # upstream of a measured stage runs unmeasured
                measured = stage in args.stages
                every = measured and args.speedup_at in (None, copies)
                for cpus in (args.cpus if every else [max(args.cpus)]):
                    profile = local / f"profile-{stage}-{cpus}cpu.txt" if (measured and args.profile) else None
                    r = run_stage(yaml_path, stage, cpus, proxy, env, profile)
                    r.update(copies=copies, corpus=corpus, measured=measured, layout=args.layout, max_part_bytes=args.max_part_bytes, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                    print(json.dumps(r), flush=True)
                    if measured:
                        results.append(r)
                        out_path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = out_path.with_suffix(".tmp")
                        tmp.write_text(json.dumps(results, indent=2))
                        tmp.replace(out_path)  # kept after every stage: a run cut short keeps what it measured
            # free moto's memory: the next size needs none of this one
            boto3.resource("s3", endpoint_url=endpoint).Bucket(BUCKET).objects.filter(Prefix=name + "/").delete()
    print(table(results))
    print(scaling_table(results))
    print(speedup_table(results))


if __name__ == "__main__":
    main()
