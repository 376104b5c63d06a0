"""The fixed costs of a run: the demo's data stages (ingest -> tokenize) as one ``lmpipe run``
would run them, from a fresh work dir, on a local Ray of ``--cpus`` CPUs.

    nice -n 10 .venv/bin/python bench/fixed_costs.py --cpus 2 [--profile] [--compare WORK_DIR]

Reports, from one process (same conditions for every number):

* ``startup_s``: from the runner's creation to the first stage's start, Ray's start included
  (the wait a user has before the first stage works: Ray, the MLflow store and pipeline run,
  fingerprints); ``ray_start_s`` and ``mlflow_start_s`` (the tracker and the pipeline run) each
  alone (they overlap where the runner opens the MLflow store in a thread);
* per stage: wall seconds (the manifest's), parts, and the driver's CPU seconds for the stage
  (this process's user+system time around the stage, Ray's driver threads included), against the
  goal of 0.5 CPU-s per stage plus 5 ms per part;
* ``data_stages_s``: the wall time from ingest's start to tokenize's commit;
* with ``--profile``: py-spy over the driver and every Ray worker, and the share of worker samples
  spent importing modules (``<frozen importlib``) and loading functions.

``--compare WORK_DIR`` then compares every file the manifests list with another work dir's
(``bench/compare_outputs.py``): the outputs must be byte-identical to a reference run's.
Run ``lmpipe fetch-demo-data`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.measure import own_cpu_seconds  # noqa: E402

DATA_STAGES = ["ingest", "language_filter", "quality_filter", "toxicity_filter", "pii_masker", "exact_dedup",
               "minhash_dedup", "decontaminate", "train_tokenizer", "tokenize"]


def data_stages_config(work_dir: Path, cpus: int) -> Path:
    """examples/demo.yaml without train and evaluate, its paths made absolute, in ``work_dir``."""
    cfg = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    cfg["stages"] = {name: cfg["stages"][name] for name in DATA_STAGES}
    for source in cfg["stages"]["ingest"]["config"]["sources"]:
        source["paths"] = [str((REPO / "examples" / p).resolve()) for p in source["paths"]]
    cfg["work_dir"] = str(work_dir)
    cfg["ray"] = {"num_cpus": cpus}  # no dashboard: the data stages do not need it
    path = work_dir.parent / "data_stages.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def measure(yaml_path: Path) -> dict:
    """Run the pipeline in this process, timing start-up and every stage."""
    from pipeline import runner as runner_mod
    from pipeline.config import load_config
    from pipeline.tracking import Tracker

    timings: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    init_ray = timed("ray_start_s", runner_mod.init_ray)

    def init_ray_noting_where(*a, **k):
        timings["ray_started_in_stage"] = "first_stage_at" in timings
        return init_ray(*a, **k)

    runner_mod.init_ray = init_ray_noting_where
    Tracker.__init__ = timed("mlflow_start_s", Tracker.__init__)
    Tracker.start_pipeline = timed("mlflow_start_s", Tracker.start_pipeline)

    stages: list[dict] = []
    run_stage = runner_mod.Runner._run_stage

    def measured_stage(self, node, *a, **k):
        cpu, t = own_cpu_seconds(), time.perf_counter()
        timings.setdefault("first_stage_at", t)
        report = run_stage(self, node, *a, **k)
        stages.append({"stage": node.name, "run_s": round(time.perf_counter() - t, 2), "driver_cpu_s": round(own_cpu_seconds() - cpu, 2),
                       "wall_s": report.manifest["timings"]["wall_seconds"], "parts": report.manifest.get("parts"),
                       "cached": report.cached})
        return report

    runner_mod.Runner._run_stage = measured_stage
    loaded = load_config(yaml_path)
    t0 = time.perf_counter()
    runner = timed("mlflow_start_s", runner_mod.Runner)(loaded)
    runner.run()
    total = time.perf_counter() - t0
    if timings.get("ray_started_in_stage"):
        # Ray started inside the first stage (when it first computes): not the stage's time
        stages[0]["run_s"] = round(stages[0]["run_s"] - timings.get("ray_start_s", 0.0), 2)
        startup = timings["first_stage_at"] - t0 + timings.get("ray_start_s", 0.0)
    else:
        startup = timings["first_stage_at"] - t0
    for s in stages:
        s["driver_goal_cpu_s"] = round(0.5 + 0.005 * (s["parts"] or 0), 3)
    return {"total_s": round(total, 2), "startup_s": round(startup, 2),
            "ray_start_s": round(timings.get("ray_start_s", 0), 2), "mlflow_start_s": round(timings.get("mlflow_start_s", 0), 2),
            "data_stages_s": round(sum(s["run_s"] for s in stages), 2), "stages": stages}


def profile_shares(path: Path) -> dict:
    """Worker samples by what they were doing: importing, loading functions, the rest."""
    from bench.pipeline_scale import profile_summary

    summary = profile_summary(path)
    worker = {name.split(": ", 1)[1]: n for name, n, _ in summary["per_category"] if name.startswith("worker: ")}
    worker_total = summary["per_process"].get("worker", 0)
    imports = worker.get("import (module loading)", 0) + worker.get("ray: load function/actor", 0)
    return {"samples": summary["samples"], "worker_samples": worker_total, "worker_import_samples": imports,
            "worker_import_share": round(imports / max(worker_total, 1), 3), "per_category": summary["per_category"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="py-spy over the driver and the workers")
    ap.add_argument("--compare", type=Path, help="a reference work dir whose outputs must be byte-identical")
    ap.add_argument("--keep", type=Path, help="keep the work dir here (default: a temporary folder, removed)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: the measured child
    args = ap.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure)), flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="lmpipe-fixed-") as tmp:
        root = args.keep or Path(tmp)
        work_dir = root / "work"
        work_dir.mkdir(parents=True, exist_ok=False)
        yaml_path = data_stages_config(work_dir, args.cpus)
        load_before = os.getloadavg()
        cmd = [sys.executable, __file__, "--measure", str(yaml_path)]
        profile = root / "profile.txt"
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        spy = None
        if args.profile:
            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(child.pid), "--subprocesses",
                                    "--nonblocking", "--rate", "50", "--format", "raw", "--output", str(profile)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, err = child.communicate()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=120)
        if child.returncode:
            raise SystemExit(f"the run failed:\n{err[-4000:]}")
        result = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
        result.update(cpus=args.cpus, load_before=[round(x, 2) for x in load_before], load_after=[round(x, 2) for x in os.getloadavg()],
                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        if args.profile and profile.exists():
            result["profile"] = profile_shares(profile)
        if args.compare:
            cmp = subprocess.run([sys.executable, str(REPO / "bench" / "compare_outputs.py"), "--stages", ",".join(DATA_STAGES),
                                  str(args.compare), str(work_dir)], capture_output=True, text=True)
            result["identical_to_reference"] = cmp.returncode == 0
            result["compare_output"] = (cmp.stdout + cmp.stderr)[-2000:]
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
