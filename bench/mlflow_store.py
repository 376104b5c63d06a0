"""What a new sqlite MLflow store costs: MLflow's own creation (every schema migration replayed)
against lmpipe's copy of an empty store made once per MLflow version. Every first run in a new
work dir pays it, and so does nearly every test of the suite (each has its own work dir).

    python bench/mlflow_store.py [--repeat 5]

CPU seconds of this process (``time.process_time``), so the figures hold on a shared machine;
wall seconds beside them. Each store is made in a fresh folder; the template's own creation (the
first copy) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="mlflow-store-bench-")
    os.environ["LMPIPE_HOME"] = os.path.join(root, "home")  # a template of this benchmark's own
    import logging

    logging.disable(logging.INFO)
    from mlflow import MlflowClient

    from pipeline.tracking import Tracker

    def mlflow_creates(i: int):
        return lambda: MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow-{i}/mlflow.db").search_experiments()

    def lmpipe_copies(i: int):
        return lambda: Tracker(f"sqlite:///{root}/lmpipe-{i}/mlflow.db", "bench")

    for i in range(args.repeat + 1):
        os.makedirs(f"{root}/mlflow-{i}")
    timed(mlflow_creates(args.repeat))  # imports and MLflow's first-use work, outside the figures
    first = timed(lmpipe_copies(args.repeat))  # makes the template
    made = [timed(mlflow_creates(i)) for i in range(args.repeat)]
    copied = [timed(lmpipe_copies(i)) for i in range(args.repeat)]
    out = {
        "mlflow_creates": {"cpu_s": statistics.median(c for c, _ in made), "wall_s": statistics.median(w for _, w in made)},
        "lmpipe_copies": {"cpu_s": statistics.median(c for c, _ in copied), "wall_s": statistics.median(w for _, w in copied)},
        "template_made_once": {"cpu_s": first[0], "wall_s": first[1]},
        "repeat": args.repeat,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
