"""The in-loop evaluation: one of the Trainer's validators, it logs validation bits per byte and
loss and a small task every N steps -- the numbers the evaluate stage gets for the same weights --
and the trainer's own validation loss does not score the split again at those steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.scoring.hook import InLoopEval
from stages.scoring.metrics import aggregate
from stages.scoring.tasks import build_requests, load_mc_task
from stages.evaluate.worker import EvalJob, TaskJob, TextJob, run_job
from tests.stages.test_evaluate_support import SEQ_LEN, mmlu_like_records, tiny_run, write_task


class Sink:
    def __init__(self):
        self.logged = []

    def log(self, step, metrics):
        self.logged.append((step, dict(metrics)))


def test_in_loop_evaluation_in_the_training_loop_matches_the_stage(tmp_path, tmp_path_factory):
    import numpy as np

    from stages.model.transformer import model_config
    from stages.tokenize.loader import TokenShardLoader
    from stages.train.config import TrainConfig
    from stages.train.data import validation_sets
    from stages.train.trainer import LocalCheckpointer, Trainer, ValidationLoss

    run = tiny_run(tmp_path_factory.getbasetemp() / "eval-tiny-run")
    task = write_task(tmp_path / "qa.jsonl", mmlu_like_records(16))
    val = validation_sets(run["validation"], None, 0, 1, 8)
    in_loop = InLoopEval.build(run["tokenizer"], every=4, val_rows=val, task=("qa", task), limit=None, prefix_token=0)
    cfg = model_config("debug", vocab_size=512, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=SEQ_LEN)
    tcfg = TrainConfig(loop={"steps": 8, "micro_batch_size": 8, "log_every": 4, "norms_every": 0}, optimizer={"lr": 3e-3},
                       schedule={"warmup_steps": 2}, checkpoint={"every": 8})
    trainer = Trainer(tcfg, cfg, TokenShardLoader(run["train"], 8, seed=0), SEQ_LEN,
                      [ValidationLoss(val, 2, superseded_by=in_loop), in_loop],
                      checkpointer=LocalCheckpointer(str(tmp_path / "ckpt")), sink=Sink())
    trainer.train()
    logged = dict(trainer.sink.logged)
    assert [step for step, m in logged.items() if "eval/qa_0shot/acc" in m] == [4, 8]
    assert [step for step, m in logged.items() if "val_loss" in m] == [2, 4, 6, 8]  # 4 and 8 from the in-loop pass
    final = logged[8]
    assert "eval/bits_per_byte/_macro" in final and trainer.model.training  # the model is handed back in training mode
    # the in-loop pass's validation loss is the trainer's, for the same weights
    own = trainer.validate([ValidationLoss(val, 8)])
    assert {k for k in final if k.startswith("val_loss")} == set(own)
    for key, value in own.items():
        assert final[key] == pytest.approx(value, rel=1e-5)

    rows = {d: v.numpy() for d, v in val.items()}
    tokens = np.concatenate([rows[d] for d in sorted(rows)])
    sources = tuple(d for d in sorted(rows) for _ in range(len(rows[d])))
    res = run_job(EvalJob(checkpoint=str(tmp_path / "ckpt" / "step_00000008"), tokenizer_json=Path(run["tokenizer"]).read_text(),
                          prefix_token=0, tasks=(TaskJob("qa", tuple(build_requests(load_mc_task("qa", task).task, "plain", 0))),),
                          texts=(TextJob("validation", "validation", tokens=tokens, sources=sources),)))
    assert aggregate(res["tasks"]["qa"]["results"])["acc"] == final["eval/qa_0shot/acc"]
    for domain, m in res["texts"]["validation"]["domains"].items():
        if domain != "_all":
            assert final[f"eval/bits_per_byte/{domain}"] == pytest.approx(m["bits_per_byte"], rel=1e-5)
