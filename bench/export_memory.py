"""Peak memory of the Hugging Face export of a preset, streaming vs consolidating in memory.

Builds a real train-stage checkpoint of the preset's shape on disk (DCP, fp32 weights with AdamW
state: ``exp_avg``, ``exp_avg_sq``, ``step``, as the trainer saves them; written one layer at a
time and merged into one checkpoint, so building it does not need the model in memory either),
then exports it in a fresh child process and reports that process's peak RSS (``VmHWM``):

* ``stream``: :func:`stages.train.export.export_checkpoint` (what the train stage runs on a worker);
* ``consolidate``: the previous export -- the whole model loaded from the checkpoint
  (``load_full_model``), then converted and written with ``safetensors.torch.save_file``. (It
  refused LayerNorm models; here it gets the StableLM layout so that the same checkpoint serves.)

    .venv/bin/python bench/export_memory.py --size 1b --modes stream,consolidate

Needs ~4 x the model's fp32 size on disk (checkpoint with optimizer state + export).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_checkpoint(path: str, size: str, vocab: int, seq_len: int) -> None:
    """A checkpoint of the preset in the trainer's layout, written group by group (embedding, each
    layer, head) with DCP and merged: each group's ``__0_0.distcp`` becomes ``__0_<g>.distcp`` and
    the groups' metadata become one (only the storage file names change)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from stages.model.checkpoint import MODEL_CONFIG
    from stages.model.transformer import Transformer, model_config

    cfg = model_config(size, vocab_size=vocab, max_seq_len=seq_len)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    def group(name: str) -> str:  # one layer's tensors together; the embedding, final norm and head each alone
        return ".".join(name.split(".")[:2]) if name.startswith("layers.") else name

    groups = [list(names) for _, names in itertools.groupby(shapes, key=group)]
    tmp = path + ".parts"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    merged = None
    for g, names in enumerate(groups):
        model = {n: torch.randn(shapes[n], generator=gen) * 0.02 for n in names}
        optim = {n: {"exp_avg": torch.randn(shapes[n], generator=gen) * 1e-3, "exp_avg_sq": torch.rand(shapes[n], generator=gen) * 1e-6,
                     "step": torch.tensor(1000.0)} for n in names}
        part = os.path.join(tmp, str(g))
        dcp.save({"model": model, "optim": optim}, storage_writer=FileSystemWriter(part), no_dist=True)
        del model, optim
        with open(os.path.join(part, ".metadata"), "rb") as f:
            md = pickle.load(f)  # written just now by this process
        files = {info.relative_path for info in md.storage_data.values()}
        renames = {rel: rel.replace("__0_", f"__{g}_", 1) for rel in files}
        for old, new in renames.items():
            os.replace(os.path.join(part, old), os.path.join(path, new))
        md.storage_data = {idx: dataclasses.replace(info, relative_path=renames[info.relative_path]) for idx, info in md.storage_data.items()}
        if merged is None:
            merged = md
        else:
            merged.state_dict_metadata.update(md.state_dict_metadata)
            merged.storage_data.update(md.storage_data)
            if merged.planner_data is not None and md.planner_data:
                merged.planner_data.update(md.planner_data)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(merged, f)
    with open(os.path.join(path, MODEL_CONFIG), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    shutil.rmtree(tmp, ignore_errors=True)


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(mode: str, checkpoint: str, out: str, dtype_name: str) -> None:
    """One export in this (fresh) process; prints its peak RSS and time as JSON."""
    import torch

    from stages.model.checkpoint import load_full_model
    from stages.model.hf import to_hf_config, to_hf_state_dict
    from stages.train.export import export_checkpoint

    dtype = getattr(torch, dtype_name)
    baseline = peak_rss_bytes()  # the interpreter with torch imported
    start = time.perf_counter()
    if mode == "stream":
        export_checkpoint(checkpoint, out, dtype=dtype)
    else:  # the export before streaming: consolidate, convert, write one file
        from safetensors.torch import save_file

        model = load_full_model(checkpoint)
        os.makedirs(out, exist_ok=True)
        state, seen = to_hf_state_dict(model, dtype), set()
        for name, tensor in state.items():  # safetensors refuses shared tensors: StableLM's per-head norms share ours
            if tensor.data_ptr() in seen:
                state[name] = tensor.clone()
            seen.add(tensor.data_ptr())
        save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(to_hf_config(model.cfg, None, dtype), f)
    print(json.dumps({"mode": mode, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline, "seconds": time.perf_counter() - start}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1b")
    p.add_argument("--vocab", type=int, default=50_432, help="OpenLM-1B's GPT-NeoX vocabulary, padded")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--modes", default="stream,consolidate")
    p.add_argument("--work", default="/tmp/lmpipe-export-bench")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint for another run")
    p.add_argument("--child", nargs=4, metavar=("MODE", "CKPT", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return

    from stages.model.transformer import model_config

    cfg = model_config(args.size, vocab_size=args.vocab, max_seq_len=args.seq_len)
    ckpt = os.path.join(args.work, f"{args.size}-v{args.vocab}-ckpt")
    if not os.path.exists(os.path.join(ckpt, "model_config.json")):
        start = time.perf_counter()
        build_checkpoint(ckpt, args.size, args.vocab, args.seq_len)
        print(f"built {ckpt} in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    rows = []
    for mode in args.modes.split(","):
        out = os.path.join(args.work, f"hf-{mode}")
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, ckpt, out, args.dtype],
                              cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} export failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["files"] = sorted(os.listdir(out))
        result["export_bytes"] = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        rows.append(result)
        shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    gib = 1024**3
    print(f"preset {args.size}: {cfg.num_params() / 1e9:.2f} B parameters (vocab {args.vocab}), fp32 weights {cfg.num_params() * 4 / gib:.2f} GiB; "
          f"checkpoint {ckpt_bytes / gib:.2f} GiB (with AdamW state); export dtype {args.dtype}")
    print("| export | peak RSS | of which torch + interpreter | time | files |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        shards = [f for f in r["files"] if f.endswith(".safetensors")]
        print(f"| {r['mode']} | {r['peak_rss'] / gib:.2f} GiB | {r['baseline_rss'] / gib:.2f} GiB | {r['seconds']:.0f} s | "
              f"{len(shards)} safetensors, {r['export_bytes'] / gib:.2f} GiB |")


if __name__ == "__main__":
    main()
