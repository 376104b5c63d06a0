"""In-loop = offline: one checkpoint scored by the train stage's in-loop evaluation (the model
sharded with FSDP2 under a process group, no export) and by the evaluate stage -- from the checkpoint,
and from its Hugging Face export run by ``transformers`` -- gives the same numbers: bits per byte
and loss per domain, accuracy, and bits per byte on the gold answers. fp32 on CPU; the in-loop
pass and the stage's job score the same requests with the same batching, so they agree to the
last bit; ``transformers`` computes the same function with other kernels (a plain causal pass per
choice instead of a shared context), within 1e-6.

The process group has one rank, as a single-worker train stage runs (it shards all the same: the
blocks and the root gather and free their parameters around every forward); the same check over
two spawned ranks gives the same bits, at several times the cost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.scoring.tasks import build_requests, load_mc_task
from tests.stages.test_evaluate_support import SEQ_LEN, mmlu_like_records, tiny_run, write_task

pytest.importorskip("transformers")

VALIDATION_ROWS = 8  # per domain


def in_loop_sharded(run: dict, task_path: str, pg_file: str) -> tuple[int, dict[str, float]]:
    """A sharded trainer restored from the run's last checkpoint, evaluated by its validators: (step, metrics)."""
    import torch.distributed as dist

    from stages.model.transformer import model_config
    from stages.scoring.hook import InLoopEval
    from stages.tokenize.loader import TokenShardLoader
    from stages.train.config import TrainConfig
    from stages.train.data import validation_sets
    from stages.train.trainer import Trainer

    cfg = model_config("debug", vocab_size=512, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=SEQ_LEN)
    tcfg = TrainConfig(loop={"steps": 30, "micro_batch_size": 8, "eval_every": 0, "norms_every": 0})
    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=0, world_size=1)
    try:
        trainer = Trainer(tcfg, cfg, TokenShardLoader(run["train"], 8, seed=0), SEQ_LEN, seed=0)
        assert trainer.sharded
        assert trainer.restore(run["checkpoints"][-1])
        # the full validation split, as the train stage hands it to the in-loop evaluation on every rank
        val = validation_sets(run["validation"], None, 0, 1, VALIDATION_ROWS)
        in_loop = InLoopEval.build(run["tokenizer"], every=1, val_rows=val, task=("qa", task_path), limit=None, prefix_token=0)
        return trainer.state.step, trainer.validate([in_loop])
    finally:
        dist.destroy_process_group()


def offline(run: dict, checkpoint: str, task_path: str, hf_runtime: str = "lmpipe") -> dict:
    """The evaluate stage's job on ``checkpoint``, as the in-loop metrics name them."""
    from stages.evaluate.worker import EvalJob, TaskJob, TextJob, run_job
    from stages.scoring.metrics import aggregate
    from stages.train.data import validation_sets

    val = {d: v.numpy() for d, v in validation_sets(run["validation"], None, 0, 1, VALIDATION_ROWS).items()}
    tokens = np.concatenate([val[d] for d in sorted(val)])
    sources = tuple(d for d in sorted(val) for _ in range(len(val[d])))
    requests = tuple(build_requests(load_mc_task("qa", task_path).task, "plain", 0))
    res = run_job(EvalJob(checkpoint=checkpoint, tokenizer_json=Path(run["tokenizer"]).read_text(), prefix_token=0,
                          tasks=(TaskJob("qa_0shot", requests),), texts=(TextJob("validation", "validation", tokens=tokens, sources=sources),),
                          hf_runtime=hf_runtime))
    agg = aggregate(res["tasks"]["qa_0shot"]["results"])
    out = {f"eval/qa_0shot/{m}": agg[m] for m in ("acc", "acc_norm", "gold_bits_per_byte")}
    for domain, m in res["texts"]["validation"]["domains"].items():
        if domain != "_all":
            out[f"eval/bits_per_byte/{domain}"] = m["bits_per_byte"]
            out["val_loss" if domain == "_macro" else f"val_loss/{domain}"] = m["nll_per_token"]
    return {"runtime": res["runtime"], "metrics": out, "lls": [r.lls for r in res["tasks"]["qa_0shot"]["results"]]}


def test_in_loop_sharded_and_offline_checkpoint_and_transformers_export_agree(tmp_path, tmp_path_factory):
    run = tiny_run(tmp_path_factory.getbasetemp() / "eval-tiny-run")  # shared with the other evaluate tests
    task = write_task(tmp_path / "qa.jsonl", mmlu_like_records(24))
    step, in_loop = in_loop_sharded(run, task, str(tmp_path / "process-group"))
    assert step == 30  # the weights of the checkpoint the others read
    in_loop = {k: v for k, v in in_loop.items() if k != "eval/seconds"}

    dcp = offline(run, run["checkpoints"][-1], task)
    hf = offline(run, run["hf"], task, hf_runtime="transformers")
    assert (dcp["runtime"], hf["runtime"]) == ("lmpipe", "transformers")
    assert set(in_loop) == set(dcp["metrics"]) == set(hf["metrics"])
    assert {"eval/bits_per_byte/answers", "eval/bits_per_byte/questions", "eval/qa_0shot/gold_bits_per_byte"} <= set(in_loop)
    # the sharded in-loop pass and the stage: the same arithmetic, the same bits
    assert in_loop == dcp["metrics"]
    # transformers: the same predictions, every number within 1e-6
    for key, value in dcp["metrics"].items():
        assert hf["metrics"][key] == pytest.approx(value, rel=0, abs=1e-6), key
    assert np.abs(np.array(hf["lls"]) - np.array(dcp["lls"])).max() <= 1e-5
