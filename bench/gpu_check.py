"""GPU check of the training path: torch only (no Ray, no MLflow), one CUDA device.

Runs the train stage's own ``Trainer`` -- shard from birth, FSDP2 with a bf16
``MixedPrecisionPolicy`` and fp32 reduction on an NCCL process group of one rank, fused AdamW,
optional ``torch.compile`` per block and activation checkpointing -- for each preset and setting,
on real text (this repository's own source and docs as bytes), and reports tokens/s, MFU,
peak memory and the loss at the first and last step. Each setting runs in its own process (a
compile or an out-of-memory cannot leak into the next) and its row is appended to ``--out`` as
soon as it finishes, so a run stopped at a time limit keeps what it measured.

    python bench/gpu_check.py --out gpu_check.jsonl                      # the full check
    python bench/gpu_check.py --device cpu --sizes debug --steps 4       # the same code on CPU

MFU = tokens/s x training FLOPs per token (``ModelConfig.flops_per_token``) / the device's dense
bf16 peak (H100/H200: 989 TFLOP/s). An unknown device gets no MFU and a warning, never a guess;
``--peak-tflops`` sets it.

The device machine needs, besides torch, the packages ``stages.train`` imports (pydantic,
zstandard, ...): carried as wheels (BENCHMARKS.md, "GPU check", says how).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# micro-batch per size at seq 2048: big enough to keep an H200 busy, small enough to fit without
# activation checkpointing
MICRO_BATCH = {"debug": 4, "125m": 32, "350m": 16, "1b": 16, "llama-1b": 16, "tinyllama-1b": 16, "7b": 2}


def corpus_bytes() -> bytes:
    """Real text: this repository's Python, Markdown and YAML files."""
    parts = []
    for pattern in ("**/*.py", "**/*.md", "**/*.yaml"):
        for path in sorted(glob.glob(os.path.join(ROOT, pattern), recursive=True)):
            if "/.venv/" in path or "/.whl/" in path:
                continue
            with open(path, "rb") as f:
                parts.append(f.read())
    return b"\n".join(parts)


class ByteWindows:
    """Random windows of ``seq_len + 1`` bytes of the corpus (token id = byte), seeded, resumable."""

    def __init__(self, data: bytes, batch: int, seq_len: int, seed: int):
        import numpy as np
        import torch

        self.tokens = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"corpus of {len(self.tokens)} bytes is shorter than one sequence")
        self.batch, self.seq_len, self.seed, self.position = batch, seq_len, seed, 0

    def __iter__(self):
        import torch

        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
            starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch,), generator=g)
            rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
            self.position += 1
            yield rows[:, :-1].pin_memory() if torch.cuda.is_available() else rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


class Capture:
    """The trainer's metrics sink: keeps every logged row."""

    def __init__(self):
        self.rows: list[dict[str, Any]] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One setting, in this process: returns its result row."""
    import torch
    import torch.distributed as dist

    from stages.model.transformer import model_config
    from stages.train.config import TrainConfig
    from stages.train.trainer import Trainer, device_peak_flops

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1)
    row: dict[str, Any] = {"size": args.size, "compile": args.compile, "activation_checkpointing": args.ac,
                           "seq_len": args.seq_len, "micro_batch": args.micro_batch, "device": device.type}
    try:
        cfg_model = model_config(args.size, vocab_size=32_000 if args.size != "debug" else 512, max_seq_len=args.seq_len)
        steps = args.warmup + args.steps
        train_cfg = TrainConfig.model_validate({
            "optimizer": {"lr": args.lr},
            "schedule": {"warmup_steps": min(args.warmup, steps - 1)},
            "loop": {"steps": steps, "micro_batch_size": args.micro_batch, "log_every": args.warmup,
                     "norms_every": 0, "eval_every": 0, "spike_std": 0, "deterministic": False,
                     "peak_tflops": args.peak_tflops},
            "parallel": {"compile": args.compile, "activation_checkpointing": args.ac, "mixed_precision": "auto"},
        })
        if device.type == "cuda":
            row["device_name"] = torch.cuda.get_device_name(device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        peak = device_peak_flops(device, args.peak_tflops * 1e12 if args.peak_tflops else None)
        if device.type == "cuda" and peak is None:
            print(f"WARNING: no known bf16 peak for {row.get('device_name')}: MFU not reported (give --peak-tflops)", flush=True)
        sink = Capture()
        t0 = time.perf_counter()
        loader = ByteWindows(corpus_bytes(), args.micro_batch, args.seq_len, seed=0)
        trainer = Trainer(train_cfg, cfg_model, loader, args.seq_len, sink=sink, device=device, seed=0)
        row["setup_s"] = round(time.perf_counter() - t0, 1)
        row["params"] = trainer.num_params
        row["flops_per_token"] = trainer.flops_per_token
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = trainer.train()
        row["train_s"] = round(time.perf_counter() - t0, 1)
        timed = sink.rows[-1]  # the window after warmup (compile happens in the first steps)
        row.update({
            "tokens_per_second": round(timed["tokens_per_second"]),
            "step_time_s": round(timed["step_time"], 4),
            "mfu": round(timed["mfu"], 4) if "mfu" in timed else None,
            "peak_memory_gib": round(timed["peak_memory_bytes"] / 2**30, 2),
            "loss_first": round(sink.rows[0]["loss"], 4),
            "loss_last": round(timed["loss"], 4),
            "losses": [round(r["loss"], 4) for r in sink.rows],
            "skipped_steps": len(result["skipped"]),
            "ok": True,
        })
    except Exception as exc:  # a row per failure: the check goes on with the next setting
        row.update({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]})
        if "out of memory" in str(exc).lower():
            row["error"] = "CUDA out of memory"
    finally:
        dist.destroy_process_group()
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(sizes: list[str], compile_modes: list[bool], ac_modes: list[bool]) -> list[tuple[str, bool, bool]]:
    """Eager settings first (quick), then compiled ones: a time limit cuts the slow end."""
    return [(s, c, a) for c in compile_modes for s in sizes for a in ac_modes]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="125m,350m,1b")
    p.add_argument("--compile", default="off,on", help="comma list of on/off")
    p.add_argument("--ac", default="off,on", help="activation checkpointing: comma list of on/off")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=None, help="default: per size (MICRO_BATCH)")
    p.add_argument("--warmup", type=int, default=5, help="steps before the timed window (compile happens here)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default="gpu_check.jsonl")
    p.add_argument("--per-setting-timeout", type=int, default=300)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one setting here
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    onoff = lambda s: [x.strip() == "on" for x in s.split(",")]  # noqa: E731
    if args.one:
        args.compile, args.ac = args.compile == "on", args.ac == "on"
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    for size, compiled, ac in settings(args.sizes.split(","), onoff(args.compile), onoff(args.ac)):
        mb = args.micro_batch or MICRO_BATCH.get(size, 8)
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--size", size, "--compile", "on" if compiled else "off",
               "--ac", "on" if ac else "off", "--seq-len", str(args.seq_len), "--micro-batch", str(mb), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--lr", str(args.lr), "--device", args.device, "--port", str(free_port())]
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.per_setting_timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {
                "size": size, "compile": compiled, "activation_checkpointing": ac, "ok": False,
                "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:400]}
        except subprocess.TimeoutExpired:
            row = {"size": size, "compile": compiled, "activation_checkpointing": ac, "ok": False,
                   "error": f"timed out after {args.per_setting_timeout}s"}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        mfu = f"{row['mfu'] * 100:.1f}%" if row.get("mfu") else "n/a"
        print(f"{size:>8} compile={'on ' if compiled else 'off'} ac={'on ' if ac else 'off'} | "
              + (f"{row['tokens_per_second']:>9,} tok/s | MFU {mfu:>6} | {row['peak_memory_gib']:6.1f} GiB | "
                 f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f} | {row['wall_s']}s" if row.get("ok") else f"FAILED: {row['error']} ({row['wall_s']}s)"),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
