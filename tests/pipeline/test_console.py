"""What a person watching a run sees: lmpipe's own lines on the screen (no escape codes, no Ray
Data progress blocks) and everything else -- Ray's lines included -- in the run's log file."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline import console

LMPIPE = [sys.executable, "-m", "pipeline.cli"]


def test_a_run_into_a_file_shows_lmpipe_lines_and_keeps_ray_lines_in_the_log(tmp_path):
    from stages.assets import news_articles

    articles = news_articles()[:200]
    for i in range(2):
        with open(tmp_path / f"news-{i}.jsonl", "w") as f:
            for a in articles[i::2]:
                f.write(json.dumps(a) + "\n")
    config = tmp_path / "p.yaml"
    config.write_text(f"""
name: console
work_dir: {tmp_path}/work
ray: {{num_cpus: 2}}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: news, paths: ["{tmp_path}/*.jsonl"]}}]
  quality:
    uses: quality_filter
    inputs: [ingest]
""")
    env = {k: v for k, v in os.environ.items() if k not in ("LMPIPE_PROGRESS", "RAY_DATA_LOG_LEVEL", console.LOG_DIR_ENV)}
    out = tmp_path / "screen.txt"
    with open(out, "w") as screen:  # not a terminal, as in CI or `lmpipe run ... > run.log`
        proc = subprocess.run([*LMPIPE, "run", str(config)], stdout=screen, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = out.read_text()
    assert proc.returncode == 0, text
    assert "\x1b" not in text  # no colour codes, no cursor movement
    for ray_only in ("Total Progress", "logging_progress", "Execution plan", "core_worker", "Started a local Ray", "mlflow.store"):
        assert ray_only not in text, (ray_only, text)
    assert "[ingest] committed" in text and "[quality] committed" in text
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO \[quality\] running", text, re.M), text  # plain, timestamped
    logs = list((tmp_path / "work" / "_logs").glob("run-*.log"))
    assert len(logs) == 1 and str(logs[0]) in text  # the log file is named once on the screen
    kept = logs[0].read_text()
    assert "Started a local Ray" in kept  # nothing Ray printed is lost
    assert "[quality] committed" in kept and "\x1b" not in kept


def test_worker_lines_are_split_into_lmpipe_lines_and_the_rest(caplog):
    caplog.set_level(logging.INFO)
    console._said.clear()
    console._worker_lines({"pid": 42, "actor_name": "RayTrainWorker", "lines": [
        "\x1b[36m" + console.WORKER_MARK + "INFO step 10/300 | loss 9.2108\x1b[0m",
        "Setting up process group for: env:// [rank=0, world_size=2]",
        console.WORKER_MARK + "WARNING step 11: loss is nan: skipped",
        "(raylet) Spilled 2048 MiB, 12 objects, write throughput 900 MiB/s",
    ]})
    seen = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert ("lmpipe.worker", "INFO", "step 10/300 | loss 9.2108") in seen
    assert ("lmpipe.worker", "WARNING", "step 11: loss is nan: skipped") in seen
    assert ("ray.worker_output", "INFO", "(RayTrainWorker pid=42) Setting up process group for: env:// [rank=0, world_size=2]") in seen


def test_a_ray_line_that_matters_is_said_once_in_lmpipe_words(caplog):
    caplog.set_level(logging.INFO)
    console._said.clear()
    for _ in range(3):
        console.notice("[2026-12-03 10:12:16,594 E 5089 5089] Spilled 3000 MiB, 40 objects")
    console.notice("Execution plan of Dataset dataset_0: InputDataBuffer[Input]")
    said = [r.getMessage() for r in caplog.records if r.name == "lmpipe"]
    assert said == ["Ray's object store is full and spills objects to disk: stages run slower"]


def test_the_screen_is_plain_outside_a_terminal(tmp_path):
    stream = open(tmp_path / "s.txt", "w")
    handler = console._Console(stream, tty=False)
    handler.status("[x] 1/2 parts")  # no live line outside a terminal
    handler.emit(logging.LogRecord("lmpipe", logging.INFO, __file__, 1, "\x1b[1mbold\x1b[0m line", None, None))
    stream.close()
    text = (tmp_path / "s.txt").read_text()
    assert text.endswith("INFO bold line\n") and "\x1b" not in text and "parts" not in text
