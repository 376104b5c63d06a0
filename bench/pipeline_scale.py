"""How the demo's data stages scale: per stage wall time, documents in/out, bytes read/written on S3,
driver peak RSS and the largest Ray worker's peak RSS, on N copies of the demo corpus with work_dir on
the moto S3 server (``--local``: on local disk), on a local Ray of ``--cpus`` CPUs (several values: the
1-vs-2-worker speedup).

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

Cores that pay: the 1 -> 2 CPU speedup read against what this machine gives two busy processes
(``bench/core_ceiling.py``, whose JSON ``--ceiling`` reads; or a number), work_dir on local disk so
that no S3 server shares the cores:

    nice -n 10 .venv/bin/python bench/core_ceiling.py --repeats 3
    .venv/bin/python bench/pipeline_scale.py --copies 8 --cpus 1 2 --local --ceiling bench/results/core_ceiling.json

Every parallel section of a measured stage (each ``FanOut.map`` / ``map_on_workers`` / ``exchange``
call: its step, items, wall time and, for parts, each part's own seconds) is recorded, so the stage's
wall time splits into work outside any fan-out (the driver: planning, fingerprints, manifests,
MLflow; train_tokenizer's training), single-task sections and parallel sections (parts; dedup's
shuffles). The speedup table divides each stage's speedup by the ceiling, gives the best the stage
could reach with these sections at that ceiling (serial work unchanged, each parallel section at
the ceiling or at its largest item, whichever is slower) and, below 0.85 of the ceiling, names what
held it: the component that lost the most time against the ideal (W1 / ceiling).
"""

from __future__ import annotations

import argparse
import contextlib
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


def pipeline_yaml(corpus: Path, copies: int, name: str, local: Path, endpoint: str | None,
                  one_file: dict[str, Path] | None = None, max_part_bytes: int | None = None) -> str:
    """examples/demo.yaml's data stages with this run's sources, work_dir, MLflow and S3 endpoint
    (``endpoint`` None: work_dir on local disk, below ``local``)."""
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
        "work_dir": f"s3://{BUCKET}/{name}" if endpoint else str(local / "work"),
        "seed": demo["seed"],
        "mlflow": {"tracking_uri": f"sqlite:///{local}/mlflow.db"},
        "storage": {"s3": {"endpoint_url": endpoint, "key": "${AWS_ACCESS_KEY_ID}", "secret": "${AWS_SECRET_ACCESS_KEY}"}},
        "stages": stages,
    }
    if not endpoint:
        del doc["storage"]
    return yaml.safe_dump(doc, sort_keys=False)


def record_fan_outs(cpus: int) -> list[dict]:
    """Record every parallel section of this process from now on (FanOut.map, map_on_workers,
    exchange): kind, step, items, how many at once (at most ``cpus``), wall s, and each item's own
    seconds where its result carries them (a part's PartResult.seconds)."""
    from pipeline.fanout import FanOut

    sections: list[dict] = []

    def item_seconds(results) -> list[float]:
        out = []
        for r in results if isinstance(results, list) else []:
            if isinstance(r, (str, bytes)):
                try:
                    r = json.loads(r)
                except ValueError:
                    continue
            seconds = r.get("seconds") if isinstance(r, dict) else getattr(r, "seconds", None)
            if isinstance(seconds, (int, float)):
                out.append(float(seconds))
        return out

    def timed(kind: str, original, items_of, width_of):
        def wrapper(self, *args, **kwargs):
            t = time.perf_counter()
            result = original(self, *args, **kwargs)
            items = items_of(args, kwargs)
            secs = item_seconds(result)
            sections.append({"kind": kind, "step": kwargs.get("step") or getattr(args[0], "__name__", kind), "items": items,
                             "width": min(items, width_of(args, kwargs) or items, cpus), "wall_s": round(time.perf_counter() - t, 3),
                             "item_s_max": round(max(secs), 3) if secs else None, "item_s_sum": round(sum(secs), 3) if secs else None})
            return result
        return wrapper

    FanOut.map = timed("map", FanOut.map, lambda a, k: len(a[1]), lambda a, k: k.get("max_parallel"))
    FanOut.map_on_workers = timed("workers", FanOut.map_on_workers, lambda a, k: len(a[2]), lambda a, k: k.get("workers"))
    FanOut.exchange = timed("exchange", FanOut.exchange, lambda a, k: a[2] if len(a) > 2 else k["partitions"], lambda a, k: None)
    return sections


def measure(yaml_path: str, stage: str, cpus: int) -> None:
    """The measured process: recompute one stage (upstream cached); print its numbers as JSON."""
    import ray

    from pipeline import local_ray
    from pipeline.config import load_config
    from pipeline.runner import Runner

    local_ray.start(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=1 << 30)
    baseline = driver_peak_rss()
    runner = Runner(load_config(yaml_path))
    spy = None
    if os.environ.get("PIPELINE_SCALE_PROFILE"):  # py-spy over the driver and every process below it (the workers)
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()), "--subprocesses",
                                "--nonblocking", "--rate", "50", "--format", "raw", "--output", os.environ["PIPELINE_SCALE_PROFILE"]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach before the stage starts
    sections = record_fan_outs(cpus)
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
        "worker_peak_private": workers.peak_private, "sections": sections,
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
    down0, up0 = (proxy.down, proxy.up) if proxy else (0, 0)
    t = time.perf_counter()
    for attempt in range(3):  # on a loaded machine Ray's start can time out: that is not the stage's failure
        out = subprocess.run([sys.executable, __file__, "--measure", str(yaml_path), stage, str(cpus)], env=env,
                             capture_output=True, text=True)
        if not (out.returncode and "timed out during startup" in out.stderr):
            break
        print(f"# {stage}: Ray's start timed out (load {os.getloadavg()[0]:.1f}); again", flush=True)
    if out.returncode:
        raise SystemExit(f"{stage} ({yaml_path}) failed:\n{out.stderr[-4000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    r.update(stage=stage, cpus=cpus, process_s=round(time.perf_counter() - t, 1),
             s3_read=proxy.down - down0 if proxy else None, s3_written=proxy.up - up0 if proxy else None, load_before=[round(x, 2) for x in load_before],
             load_after=[round(x, 2) for x in os.getloadavg()])
    if profile is not None and profile.exists():
        r["profile"] = profile_summary(profile)
    return r


def mib(b: int) -> str:
    return f"{b / 2**20:,.0f}"


def mib_or_dash(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def table(results: list[dict]) -> str:
    rows = ["| copies | CPUs | stage | parts | wall s | worker CPU s | driver CPU s | docs in | docs out | S3 read MiB | S3 written MiB | driver peak MiB | worker peak RSS / private MiB | load 1m before/after |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        rows.append(f"| {r['copies']} | {r['cpus']} | {r['stage']} | {r.get('parts') or '-'} | {r['wall_s']:.1f} | {r['worker_cpu_s']:.1f} | {r['driver_cpu_s']:.1f} | {r['docs_in']:,} |"
                    f" {r['docs_out']:,} | {mib_or_dash(r['s3_read'])} | {mib_or_dash(r['s3_written'])} | {mib(r['driver_peak_rss'])} |"
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
                    f" {' / '.join(mib_or_dash(runs[c]['s3_read']) for c in n)} |"
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


ENOUGH_PARTS = 4  # two per worker at 2 CPUs: fewer, and the goal does not apply (a part is not split)
GOAL = 0.85  # of the ceiling


def read_ceiling(value: str, kernel: str) -> tuple[float, str]:
    """``--ceiling``: a number, or bench/core_ceiling.py's JSON (that kernel's median over its
    trials); with what it is, for the table's caption."""
    try:
        return float(value), f"{float(value):.2f} (given)"
    except ValueError:
        pass
    report = json.loads(Path(value).read_text())
    k = report["kernels"][kernel]
    loads = [t[n]["load_1m_at_start"] for t in k["trials"] for n in ("one", "two")]
    return k["ceiling_median"], (f"{k['ceiling_median']:.2f} ({kernel} kernel, median of {len(k['trials'])} trials,"
                                 f" {k['ceiling_min']:.2f}-{k['ceiling_max']:.2f}; {report['date']}, load 1m {min(loads):.2f}-{max(loads):.2f})")


def split_wall(r: dict, parallel: list[bool] | None = None) -> dict:
    """A stage's wall time as work outside any fan-out (the driver), single-task sections and
    parallel sections, from the sections the measured process recorded. ``parallel``: which
    sections count as parallel (default: those of 2+ items); the 1-CPU run takes the 2-CPU run's,
    since a stage may size a step by the CPUs (dedup's partitions: 1 at 1 CPU, 2 at 2)."""
    sections = r.get("sections") or []
    if parallel is None or len(parallel) != len(sections):
        parallel = [x["items"] >= 2 for x in sections]
    for x, par in zip(sections, parallel):
        x["parallel"] = par
    single = sum(x["wall_s"] for x in sections if not x["parallel"])
    par = [x for x in sections if x["parallel"]]
    return {"serial": max(r["wall_s"] - single - sum(x["wall_s"] for x in par), 0.0), "single": single,
            "parallel": sum(x["wall_s"] for x in par), "shuffle": sum(x["wall_s"] for x in par if x["kind"] == "exchange"),
            "sections": sections}


def split_both(one: dict, two: dict) -> tuple[dict, dict]:
    """split_wall of the 1-CPU and the 2-CPU run, sections classed by the 2-CPU run."""
    b = split_wall(two)
    return split_wall(one, [x["parallel"] for x in b["sections"]]), b


def what_holds(one: dict, two: dict, ceiling: float) -> tuple[float, str]:
    """(the best 2-CPU wall time these sections allow at ``ceiling``, what lost the most time
    against the ideal wall time W1 / ceiling: the driver, a single task, a single part, a shuffle,
    or parallel parts that ran slower than the ceiling)."""
    a, b = split_both(one, two)
    # best: serial and single-task work unchanged; each parallel section at the ceiling or its largest item
    best = a["serial"] + a["single"]
    for x in a["sections"]:
        if x["parallel"]:
            best += max(x["wall_s"] / ceiling, x["item_s_max"] or 0.0)
    losses = {k: b[k] - a[k] / ceiling for k in ("serial", "single", "parallel")}
    worst = max(losses, key=losses.get)
    if worst == "serial":
        why = (f"driver: {a['serial']:.1f} s outside fan-outs at 1 CPU, {b['serial']:.1f} s at 2"
               f" (driver CPU {one['driver_cpu_s']:.1f} / {two['driver_cpu_s']:.1f} s)")
    elif worst == "single":
        steps = sorted({x["step"] for x in a["sections"] if not x["parallel"]})
        why = f"a single task ({', '.join(steps)}): {a['single']:.1f} s at 1 CPU, {b['single']:.1f} s at 2"
    else:
        par = [x for x in a["sections"] if x["parallel"]]
        big = max(par, key=lambda x: (x["item_s_max"] or 0.0) - x["wall_s"] / ceiling) if par else None
        if big is None:
            why = "no parallel section recorded"
        elif a["shuffle"] and (b["shuffle"] - a["shuffle"] / ceiling) >= losses["parallel"] / 2:
            why = f"the shuffle (exchange steps): {a['shuffle']:.1f} s at 1 CPU, {b['shuffle']:.1f} s at 2"
        elif big["item_s_max"] and big["item_s_max"] >= 0.8 * big["wall_s"] / ceiling:
            why = (f"a single part ({big['step']}): the largest of {big['items']} took {big['item_s_max']:.1f} s"
                   f" of the section's {big['wall_s']:.1f} s at 1 CPU")
        else:
            why = (f"parallel sections {a['parallel']:.1f} -> {b['parallel']:.1f} s ({a['parallel'] / max(b['parallel'], 1e-9):.2f}x),"
                   f" worker CPU {one['worker_cpu_s']:.1f} -> {two['worker_cpu_s']:.1f} s")
            if len(a["sections"]) == len(b["sections"]):
                x, y = max(((x, y) for x, y in zip(a["sections"], b["sections"]) if x["parallel"]),
                           key=lambda xy: xy[1]["wall_s"] - xy[0]["wall_s"] / ceiling)
                why += f"; most of it {x['step']!r} ({x['items']} items): {x['wall_s']:.1f} -> {y['wall_s']:.1f} s"
                if x["item_s_sum"] and y["item_s_sum"]:
                    # the items' own seconds (more at 2: two workers contend) and the section's time beyond
                    # them (worker start-up, scheduling, results: what a second worker does not share)
                    why += (f", the items' own s {x['item_s_sum']:.1f} -> {y['item_s_sum']:.1f}, time beyond them"
                            f" {x['wall_s'] - x['item_s_sum'] / x['width']:.1f} -> {y['wall_s'] - y['item_s_sum'] / y['width']:.1f} s")
    return best, why


def ceiling_table(results: list[dict], ceiling: float) -> str:
    """Per stage measured at the fewest and the most CPUs: the speedup as a fraction of the
    machine's ceiling, the best these sections allow, and below the goal what held it."""
    by_key: dict[tuple[int, str], dict[int, dict]] = {}
    for r in results:
        by_key.setdefault((r["copies"], r["stage"]), {})[r["cpus"]] = r
    rows = ["| copies | stage | parts | wall s 1 / 2 CPUs | outside fan-outs s | single-task s | parallel s (of it shuffle) |"
            " worker CPU s | driver CPU s | speedup | of ceiling | best at ceiling | load 1m | what holds it |",
            "|---:|---|---:|---|---|---|---|---|---|---:|---:|---:|---|---|"]
    for (copies, stage), runs in by_key.items():
        if len(runs) < 2:
            continue
        one, two = runs[min(runs)], runs[max(runs)]
        a, b = split_both(one, two)
        speedup = one["wall_s"] / two["wall_s"]
        best, why = what_holds(one, two, ceiling)
        parts = one.get("parts") or 0
        if speedup / ceiling >= GOAL:
            why = "goal met"
        elif parts < ENOUGH_PARTS:
            why = f"too few parts ({parts}); {why}"
        rows.append(f"| {copies} | {stage} | {parts} | {one['wall_s']:.1f} / {two['wall_s']:.1f} | {a['serial']:.1f} / {b['serial']:.1f} |"
                    f" {a['single']:.1f} / {b['single']:.1f} | {a['parallel']:.1f} ({a['shuffle']:.1f}) / {b['parallel']:.1f} ({b['shuffle']:.1f}) |"
                    f" {one['worker_cpu_s']:.1f} / {two['worker_cpu_s']:.1f} | {one['driver_cpu_s']:.1f} / {two['driver_cpu_s']:.1f} |"
                    f" {speedup:.2f}x | {speedup / ceiling:.2f} | {one['wall_s'] / best / ceiling:.2f} |"
                    f" {one['load_before'][0]:.1f}-{one['load_after'][0]:.1f} / {two['load_before'][0]:.1f}-{two['load_after'][0]:.1f} | {why} |")
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
    ap.add_argument("--local", action="store_true", help="work_dir on local disk (below --root), no S3 server")
    ap.add_argument("--ceiling", help="the machine's 1 -> 2 process ceiling: a number or bench/core_ceiling.py's JSON;"
                                      " adds the speedup-against-ceiling table")
    ap.add_argument("--ceiling-kernel", default="quality", help="which kernel of the ceiling JSON (default: quality)")
    ap.add_argument("--report", help="print the tables of a results JSON and exit")
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1], int(args.measure[2]))
        return
    ceiling = read_ceiling(args.ceiling, args.ceiling_kernel) if args.ceiling else None
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(table(results), scaling_table(results), speedup_table(results), sep="\n\n")
        if ceiling:
            print(f"\nceiling: {ceiling[1]}\n{ceiling_table(results, ceiling[0])}")
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
    storage = contextlib.nullcontext((None, None)) if args.local else moto_behind_proxy(root / "moto.log", [BUCKET])
    with storage as (endpoint, proxy):
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
                    r.update(copies=copies, corpus=corpus, measured=measured, layout=args.layout, max_part_bytes=args.max_part_bytes,
                             work_dir="local" if args.local else "s3", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                    print(json.dumps(r), flush=True)
                    if measured:
                        results.append(r)
                        out_path.parent.mkdir(parents=True, exist_ok=True)
                        tmp = out_path.with_suffix(".tmp")
                        tmp.write_text(json.dumps(results, indent=2))
                        tmp.replace(out_path)  # kept after every stage: a run cut short keeps what it measured
            # free moto's memory (or the disk): the next size needs none of this one
            if endpoint:
                import boto3

                boto3.resource("s3", endpoint_url=endpoint).Bucket(BUCKET).objects.filter(Prefix=name + "/").delete()
            else:
                shutil.rmtree(local / "work", ignore_errors=True)
    print(table(results))
    print(scaling_table(results))
    print(speedup_table(results))
    if ceiling:
        print(f"ceiling: {ceiling[1]}\n{ceiling_table(results, ceiling[0])}")


if __name__ == "__main__":
    main()
