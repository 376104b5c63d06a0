"""Where the test suite's CPU goes: a pytest plugin that records, for every test, its wall time and
the CPU time the whole machine spent meanwhile (``/proc/stat``: every process, Ray's and the
servers' included, which the pytest process's own rusage misses). Run the suite in one process on
an otherwise idle machine, so that the machine's CPU during a test is that test's:

    PYTHONPATH=bench .venv/bin/python -m pytest -q -n 0 -p suite_cpu

It writes ``bench/results/suite_cpu.json`` and prints the files that cost the most CPU. The sum is
a floor for the suite's wall time on N cores: CPU seconds / N, however the tests are spread.
"""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path

import pytest

OUT = Path(__file__).resolve().parent / "results" / "suite_cpu.json"
_HZ = os.sysconf("SC_CLK_TCK")
_rows: list[dict] = []


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    j0, t0 = _busy_jiffies(), time.perf_counter()
    yield
    _rows.append({"test": item.nodeid, "wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round((_busy_jiffies() - j0) / _HZ, 2)})


def pytest_sessionfinish(session, exitstatus):
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"cores": os.cpu_count(), "load_after": os.getloadavg(), "tests": _rows}, indent=1))
    files: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for r in _rows:
        f = files[r["test"].split("::")[0]]
        f[0], f[1], f[2] = f[0] + r["cpu_s"], f[1] + r["wall_s"], f[2] + 1
    cpu, wall = sum(r["cpu_s"] for r in _rows), sum(r["wall_s"] for r in _rows)
    lines = [f"\nsuite CPU: {len(_rows)} tests, {cpu:.0f} CPU s in {wall:.0f} s of test time; floor on {os.cpu_count()} cores "
             f"{cpu / os.cpu_count():.0f} s", "| CPU s | wall s | tests | file |", "|---:|---:|---:|---|"]
    lines += [f"| {c:.0f} | {w:.0f} | {n} | `{name}` |" for name, (c, w, n) in sorted(files.items(), key=lambda kv: -kv[1][0])[:15]]
    print("\n".join(lines))
