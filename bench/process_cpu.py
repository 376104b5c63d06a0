"""Where a command's CPU goes, process by process: runs the command and samples every process of
the machine (``/proc``) a few times a second, keeping each one's last CPU time and what it called
itself (Ray renames its workers ``ray::<task or actor>``). Run it on an otherwise idle machine, so
that every process it sees is the command's (Ray's raylet, GCS and workers are not its children).

    .venv/bin/python bench/process_cpu.py [--out FILE] -- COMMAND ...

It prints the CPU by kind of process (driver, raylet, GCS, dashboard, idle Ray workers, each named
task or actor, servers) and writes every process's row to ``bench/results/process_cpu.json``. A
process that ends between two samples loses at most one interval of its CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "process_cpu.json"
_HZ = os.sysconf("SC_CLK_TCK")


def _snapshot(own: int) -> dict[int, tuple[float, str, float]]:
    """pid -> (CPU seconds, command line, start time in clock ticks) of every process but this one."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == own:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(name)] = ((int(fields[11]) + int(fields[12])) / _HZ, cmd, int(fields[19]))
    return out


def kind(cmd: str) -> str:
    """What a process is, from its command line."""
    if cmd.startswith("ray::"):
        title = cmd.split()[0]
        return "ray worker: idle" if title == "ray::IDLE" else f"ray worker: {title[5:]}"
    for pattern, name in (("gcs_server", "ray: gcs_server"), ("/raylet", "ray: raylet"), ("dashboard/agent.py", "ray: dashboard agent"),
                          ("runtime_env/agent", "ray: runtime env agent"), ("dashboard.py", "ray: dashboard"),
                          ("log_monitor.py", "ray: log monitor"), ("monitor.py", "ray: monitor"), ("default_worker.py", "ray worker: starting"),
                          ("moto", "S3 server (moto)"), ("mlflow", "mlflow server"), ("gunicorn", "mlflow server"), ("uvicorn", "mlflow server")):
        if pattern in cmd:
            return name
    return re.sub(r"\s+", " ", cmd)[:80] or "(kernel thread)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    own = os.getpid()
    before = {(pid, start): cpu for pid, (cpu, _, start) in _snapshot(own).items()}  # what ran before the command: its CPU so far is not the command's
    seen: dict[tuple[int, int], dict] = {}  # (pid, start) -> row: a reused pid is another process
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    while True:
        for pid, (cpu, cmd, start) in _snapshot(own).items():
            row = seen.setdefault((pid, start), {"pid": pid, "cpu_s": 0.0, "kinds": []})
            row["cpu_s"] = cpu - before.get((pid, start), 0.0)
            k = kind(cmd)
            if not cmd and row["kinds"]:  # an exited process (a zombie) has no command line: keep what it was
                continue
            if not row["kinds"] or row["kinds"][-1] != k:
                row["kinds"].append(k)
        if proc.poll() is not None:
            break
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    rows = [r for r in seen.values() if r["cpu_s"] > 0.005]
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for r in rows:
        # a Ray worker counts under the first task or actor it ran (its import cost included; an
        # actor's methods are named ``Actor.method``); "idle" only if it never ran anything
        named = [k for k in r["kinds"] if k not in ("ray worker: idle", "ray worker: starting", "ray: raylet")]
        k = named[0] if named else r["kinds"][-1]
        if k.startswith("ray worker: "):
            k = k.split(".")[0]
        by_kind[k][0] += r["cpu_s"]
        by_kind[k][1] += 1
    total = sum(v[0] for v in by_kind.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "wall_s": round(wall, 1), "cpu_s": round(total, 1), "returncode": proc.returncode,
                                    "processes": sorted(rows, key=lambda r: -r["cpu_s"])}, indent=1))
    print(f"\n{total:.1f} CPU s in {wall:.1f} s wall, {len(rows)} processes (rc {proc.returncode})")
    print("| CPU s | processes | kind |\n|---:|---:|---|")
    for k, (cpu, n) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"| {cpu:.1f} | {n} | {k} |")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
