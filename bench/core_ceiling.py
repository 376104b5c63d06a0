"""This machine's ceiling for two busy processes: how much more work two processes get done at once
than one alone, on CPU-bound kernels of lmpipe's, so that a stage's 1 -> 2 worker speedup can be read
against what the machine gives (not against 2.0).

    nice -n 10 .venv/bin/python bench/core_ceiling.py --repeats 3

Kernels (real text: the news articles of stages/assets.py, as the stages see them, batches of 2,048):

* ``quality``: the quality_filter's ``score_and_decide`` (all four rule families). It is half of the
  demo's data-stage CPU and the kind of work most stages do: Arrow string kernels, numpy, compiled
  n-gram counting and a per-process token cache, i.e. it walks megabytes per batch, so it feels a
  shared cache and memory bandwidth.
* ``minhash``: the MinHash signatures of minhash_dedup's first pass (``MinHasher.signatures_of_texts``,
  128 permutations, word 5-grams): a tight compiled loop over small arrays, nearly pure arithmetic.

If both kernels give the same ceiling the machine gives two processes that much; if ``quality`` is
lower, shared memory bandwidth or cache takes the difference.

* ``language_part``, ``quality_part``: a whole part of language_filter or quality_filter as a Ray
  worker runs it, without Ray: ``pipeline.execute.run_part`` reads a Parquet part of the news
  articles (six parts, as the demo's ingest writes them: zstd Parquet), runs the stage's
  ``process_batch`` and writes its kept, rejected and quarantined rows through the runner's part
  writer to a local folder. Their ceiling is what the machine gives a stage's parts (the kernel and
  the Parquet reading, Arrow columns and writing around it); a stage's 1 -> 2 worker speedup divided
  by it is what Ray and lmpipe's scheduling lose, the machine apart.

Method: each measured process is a fresh ``python`` (no Ray, no threads: OMP/NUMBA/Arrow at one
thread) that loads the texts, warms up (numba compiled or loaded from its cache, token cache filled by
one pass), says it is ready and waits; once every process of a trial is ready they all start at
once and each does the same fixed work (``--passes`` over the texts). Per process: docs/s and CPU
share (CPU s / wall s: below 1 means it waited for a core). Per trial: 1 process alone, then 2 at
once; ceiling = (2 x work / the slower of the two's wall) / (1 process's docs/s), so a process that
finishes early and leaves the other the machine does not inflate it. ``--pin`` pins process i to
CPU i (sched_setaffinity). ``uptime`` is printed before and after, and each trial records the
1-minute load: a ceiling measured while other jobs hold the cores says nothing about the machine.
Results: ``bench/results/core_ceiling.json`` (read by ``bench/pipeline_scale.py --ceiling``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KERNELS = ("quality", "minhash", "language", "language_part", "quality_part")
DEFAULT_PASSES = {"quality": 3, "minhash": 40, "language": 6, "language_part": 20, "quality_part": 3}  # ~5-8 s per process on one quiet core of this machine
BATCH = 2048
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def kernel(name: str, inputs: str | None = None):
    """(work(batches) -> None, batches): one pass of ``name`` over the news articles."""
    import pyarrow as pa

    from stages.assets import news_articles

    texts = [a["text"] for a in news_articles() if a["text"].strip()]
    if name == "quality":
        from stages.filters.quality import QualityConfig, score_and_decide

        cfg = QualityConfig()
        batches = [pa.array(texts[i : i + BATCH], pa.string()) for i in range(0, len(texts), BATCH)]

        def work(bs) -> None:
            for b in bs:
                score_and_decide(b, cfg)
    elif name == "minhash":
        from stages.dedup.minhash import MinHasher, ShingleConfig

        cfg, hasher = ShingleConfig(), MinHasher(128, 1)
        batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]

        def work(bs) -> None:
            for b in bs:
                hasher.signatures_of_texts(b, cfg)
    elif name == "language":  # language_filter's CLD2 call (C++), on the first max_chars of each text
        from stages.filters.langid import LanguageConfig, detect

        max_chars = LanguageConfig().max_chars
        batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]

        def work(bs) -> None:
            for b in bs:
                detect(b, max_chars)
    elif name in ("language_part", "quality_part"):
        return part_kernel(name, texts, inputs)
    else:
        raise SystemExit(f"unknown kernel {name!r}; choose from {KERNELS}")
    return work, batches, len(texts), sum(len(t) for t in texts)


PARTS = 6  # the demo's ingest writes six parts


def part_kernel(name: str, texts: list[str], inputs: str | None = None):
    """A filter stage's whole part, as a worker runs it (``run_part``), on six zstd Parquet parts of
    the news articles in a temporary folder, or on the Parquet files ``inputs`` (a glob: a stage's
    real input, e.g. the demo's ingest output); each pass writes to a new attempt folder."""
    import atexit
    import shutil
    import tempfile
    import uuid

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage as st
    from pipeline.execute import PartJob, run_part, set_up_stage
    from pipeline.stage import Part
    from stages.filters.stage import LanguageFilter, QualityFilter

    stage_cls = LanguageFilter if name == "language_part" else QualityFilter
    root = tempfile.mkdtemp(prefix="lmpipe-ceiling-")
    atexit.register(shutil.rmtree, root, True)
    if inputs:
        import glob

        files = sorted(glob.glob(inputs))
        if not files:
            raise SystemExit(f"--inputs {inputs}: no file")
        texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
    else:
        files = [os.path.join(root, f"input-{i:05d}.parquet") for i in range(PARTS)]
        for i, path in enumerate(files):
            rows = texts[i::PARTS]
            pq.write_table(pa.table({"id": [f"news/{i}/{j}" for j in range(len(rows))], "text": rows, "source": ["news"] * len(rows)}),
                           path, compression="zstd")
    parts = [Part(f"{i:05d}", {"uri": f}, os.path.getsize(f)) for i, f in enumerate(files)]
    stage = set_up_stage(stage_cls, stage_cls.Config(), stage_cls.name, 0)
    storage = st.Storage()

    def work(bs) -> None:
        attempt = f"attempt-{uuid.uuid4().hex[:12]}"
        job = PartJob(stage_cls.name, 0, storage, os.path.join(root, attempt), attempt, BATCH,
                      formats=tuple(sorted(stage_cls.output_formats.items())), max_bytes_per_file=stage.output_file_bytes())
        for part in bs:
            result = run_part(stage, part, job)
            if result.error:
                raise SystemExit(result.error)
        shutil.rmtree(os.path.join(root, attempt), ignore_errors=True)

    return work, parts, len(texts), sum(len(t) for t in texts)


def child(name: str, passes: int, cpu: int | None, inputs: str | None) -> None:
    """One measured process: warm up, say READY, wait for GO on stdin, do the work, print RESULT."""
    import pyarrow as pa

    pa.set_cpu_count(1)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    work, batches, docs, chars = kernel(name, inputs)
    work(batches)  # warm-up: numba compiled or loaded, the token cache filled (as a worker after its first part)
    print("READY", flush=True)
    sys.stdin.readline()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(passes):
        work(batches)
    wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    print("RESULT " + json.dumps({"docs": docs * passes, "chars": chars * passes, "wall_s": wall, "cpu_s": cpu_s}), flush=True)


def trial(name: str, processes: int, passes: int, pin: bool, inputs: str | None = None, timeout: float = 600.0) -> dict:
    """``processes`` children at once, each ``passes`` over the texts; their numbers and the total."""
    env = {**os.environ, **SINGLE_THREAD, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", name, str(passes)] + (["--cpu", str(i)] if pin else [])
                              + (["--inputs", inputs] if inputs else []),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for i in range(processes)]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "READY":
                raise SystemExit(f"{name}: a measured process did not start (said {line!r}, exit {p.poll()})")
        load = os.getloadavg()[0]
        for p in procs:  # all start within a few ms of each other
            p.stdin.write("GO\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                raise SystemExit(f"{name}: a measured process failed (exit {p.returncode})")
            results.append(json.loads(line[-1][len("RESULT "):]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    makespan = max(r["wall_s"] for r in results)
    return {
        "processes": processes, "load_1m_at_start": round(load, 2), "load_1m_at_end": round(os.getloadavg()[0], 2),
        "per_process_docs_per_s": [round(r["docs"] / r["wall_s"], 1) for r in results],
        "per_process_cpu_share": [round(r["cpu_s"] / r["wall_s"], 3) for r in results],
        "total_docs_per_s": round(sum(r["docs"] for r in results) / makespan, 1),
        "chars_per_s_per_process": [round(r["chars"] / r["wall_s"]) for r in results],
        "wall_s": [round(r["wall_s"], 2) for r in results],
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    ap.add_argument("--repeats", type=int, default=3, help="trials (1 process, then 2) per kernel")
    ap.add_argument("--passes", type=int, help="passes over the texts per process (default: per kernel, ~5-8 s on a quiet core)")
    ap.add_argument("--pin", action="store_true", help="pin process i to CPU i")
    ap.add_argument("--inputs", help="the part kernels' input: a glob of Parquet files (default: the news articles in six parts)")
    ap.add_argument("--out", default=str(REPO / "bench/results/core_ceiling.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.cpu, args.inputs)
        return
    before = uptime()
    print(f"# before: {before}", flush=True)
    if os.getloadavg()[0] > 2.0:
        print(f"# warning: 1-minute load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs: other jobs hold the cores,"
              " so the ceiling below is the machine's under that load, not its own", flush=True)
    report: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(), "pin": args.pin, "inputs": args.inputs,
                    "uptime_before": before, "kernels": {}}
    rows = ["| kernel | trial | load 1m | 1 process docs/s (CPU share) | 2 processes docs/s each (CPU share) | 2 processes total docs/s | ceiling |",
            "|---|---:|---:|---:|---|---:|---:|"]
    for name in args.kernels:
        passes = args.passes or DEFAULT_PASSES[name]
        trials = []
        for i in range(args.repeats):
            one = trial(name, 1, passes, args.pin, args.inputs)
            two = trial(name, 2, passes, args.pin, args.inputs)
            ceiling = two["total_docs_per_s"] / one["total_docs_per_s"]
            trials.append({"one": one, "two": two, "ceiling": round(ceiling, 3)})
            rows.append(f"| {name} | {i + 1} | {one['load_1m_at_start']:.2f} / {two['load_1m_at_start']:.2f} |"
                        f" {one['total_docs_per_s']:,.0f} ({one['per_process_cpu_share'][0]:.2f}) |"
                        f" {' + '.join(f'{d:,.0f} ({s:.2f})' for d, s in zip(two['per_process_docs_per_s'], two['per_process_cpu_share']))} |"
                        f" {two['total_docs_per_s']:,.0f} | {ceiling:.2f} |")
            print(rows[-1], flush=True)
        ceilings = [t["ceiling"] for t in trials]
        report["kernels"][name] = {"passes": passes, "trials": trials, "ceiling_median": round(statistics.median(ceilings), 3),
                                   "ceiling_min": min(ceilings), "ceiling_max": max(ceilings)}
    report["uptime_after"] = uptime()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    print("\n".join(rows))
    for name, k in report["kernels"].items():
        print(f"# {name}: ceiling median {k['ceiling_median']:.2f} (min {k['ceiling_min']:.2f}, max {k['ceiling_max']:.2f}, {len(k['trials'])} trials)")
    print(f"# after: {report['uptime_after']}\n# written: {out}")


if __name__ == "__main__":
    main()
