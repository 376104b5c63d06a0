"""The training loop in one process, no Ray: loss falls, resume is exact, bad steps never
reach the weights, checkpoints load without unpickling code."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch

from stages.model import checkpoint as ckpt
from stages.model.transformer import model_config
from stages.tokenize.loader import TokenShardLoader
from stages.train.data import rank_share, read_validation, validation_sets
from stages.train.config import TrainConfig
from stages.train.trainer import LocalCheckpointer, NonFiniteLoss, Trainer, ValidationLoss, lr_at
from tests.stages.train_support import SEQ_LEN, token_table, write_shards

MODEL = model_config("debug", dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return {
        "train": write_shards(str(folder / "train"), token_table(256, seed=0)),
        "validation": write_shards(str(folder / "validation"), token_table(32, seed=1)),
    }


def make_trainer(shards, cfg: TrainConfig, root=None) -> Trainer:
    loader = TokenShardLoader(shards["train"], cfg.loop.micro_batch_size, seed=0)
    val = validation_sets(shards["validation"], None, 0, 1, cfg.loop.eval_max_sequences)
    return Trainer(cfg, MODEL, loader, SEQ_LEN, [ValidationLoss(val, cfg.loop.eval_every)],
                   checkpointer=LocalCheckpointer(str(root)) if root else None)


def test_validation_is_dealt_evenly_over_ranks(shards):
    """Each rank gets the same number of sequences per domain, round-robin from the first
    ``max``; the in-loop evaluator's full set is what the ranks' shares were dealt from."""
    full = read_validation(shards["validation"], None, 7)
    assert full and all(len(v) == min(7, len(v)) for v in full.values())
    for world in (1, 2, 3):
        shares = [rank_share(full, r, world) for r in range(world)]
        for domain, rows in full.items():
            n = len(rows) // world
            assert all(len(s[domain]) == n for s in shares) if n else all(domain not in s for s in shares)
            if n:
                dealt = torch.stack([shares[r][domain][i] for i in range(n) for r in range(world)])
                assert torch.equal(dealt, rows[: n * world])
        assert all(torch.equal(a, b) for r in range(world) for a, b in zip(shares[r].values(),
                   validation_sets(shards["validation"], None, r, world, 7).values()))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(loop={"steps": 100}, schedule={"warmup_steps": 10, "min_lr_ratio": 0.1}, optimizer={"lr": 1e-3})
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 99) == pytest.approx(1e-4, rel=1e-2)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(10, 99))


def test_tiny_model_loss_goes_down(shards):
    cfg = TrainConfig(loop={"steps": 60, "micro_batch_size": 8, "log_every": 10, "eval_every": 30, "norms_every": 30, "z_loss": 1e-4},
                      optimizer={"lr": 3e-3}, schedule={"warmup_steps": 5})
    out = make_trainer(shards, cfg).train()
    losses = [h["loss"] for h in out["history"] if "loss" in h]
    assert losses[0] == pytest.approx(math.log(512), rel=0.1)
    assert losses[-1] < losses[0] - 1.0, losses
    assert set(out["last"]) >= {"val_loss/news", "val_loss/code", "param_norm", "optim_exp_avg_norm", "activation_rms/layer_01",
                                "tokens_per_second", "data_wait", "peak_memory_bytes", "clip_events"}
    assert "mfu" not in out["last"]  # CPU: no peak to divide by


class EveryFourth:
    """A validator that reports ``val_loss`` itself every 4 steps and at the last."""

    def __init__(self):
        self.steps = []

    def should_run(self, step, last_step):
        return step % 4 == 0 or step == last_step

    def run(self, trainer):
        assert not trainer.model.training and not torch.is_grad_enabled()
        self.steps.append(trainer.state.step)
        return {"val_loss": -1.0}


def test_validators_run_on_their_own_steps_and_the_split_is_scored_once(shards):
    cfg = TrainConfig(loop={"steps": 10, "micro_batch_size": 4, "log_every": 100, "norms_every": 0}, schedule={"warmup_steps": 1})
    fourth = EveryFourth()
    loss = ValidationLoss(validation_sets(shards["validation"], None, 0, 1, 8), 3, superseded_by=fourth)
    trainer = Trainer(cfg, MODEL, TokenShardLoader(shards["train"], 4, seed=0), SEQ_LEN, [loss, fourth])
    history = {h["step"]: h.get("val_loss") for h in trainer.train()["history"]}
    assert fourth.steps == [4, 8, 10]
    assert [step for step, v in history.items() if v is not None and v > 0] == [3, 6, 9]  # not at 12: the run ends at 10
    assert trainer.model.training


def test_grad_accumulation_reaches_global_batch(shards):
    cfg = TrainConfig(loop={"steps": 2, "micro_batch_size": 4, "global_batch_tokens": 4 * SEQ_LEN * 3, "eval_every": 0}, schedule={"warmup_steps": 1})
    trainer = make_trainer(shards, cfg)
    assert trainer.grad_accum == 3
    assert trainer.train()["tokens_seen"] == 2 * 12 * SEQ_LEN
    with pytest.raises(ValueError, match="not a multiple"):
        make_trainer(shards, TrainConfig(loop={"micro_batch_size": 4, "global_batch_tokens": 100}))


def test_resume_is_exact(shards, tmp_path):
    cfg = TrainConfig(loop={"steps": 12, "micro_batch_size": 8, "log_every": 1, "eval_every": 0, "norms_every": 0, "spike_min_window": 3},
                      optimizer={"lr": 3e-3}, schedule={"warmup_steps": 3}, checkpoint={"every": 5})
    straight = make_trainer(shards, cfg, tmp_path / "a")
    full = straight.train()
    # A fresh process picks up the step-10 checkpoint and trains steps 11-12 again.
    ckpt_dir = tmp_path / "a" / "step_00000010"
    resumed = make_trainer(shards, cfg, tmp_path / "b")
    assert resumed.restore(str(ckpt_dir))
    assert resumed.state.step == 10
    tail = resumed.train()
    assert [h["loss"] for h in tail["history"]] == [h["loss"] for h in full["history"]]  # history restored + continued
    for (name, a), b in zip(weights(straight).items(), weights(resumed).values()):
        assert torch.equal(a, b), name
    assert resumed.state.window == straight.state.window


def test_a_ray_resume_reads_the_checkpoint_and_leaves_no_copy_behind(shards, tmp_path, monkeypatch):
    """Restoring under Ray Train reads the checkpoint where Ray hands it over; before, every
    restore left a full copy (optimizer state included) in the temp folder, never removed."""
    import tempfile

    import ray.train

    from stages.train.launch import RayCheckpointer

    cfg = TrainConfig(loop={"steps": 2, "micro_batch_size": 4, "eval_every": 0, "norms_every": 0}, schedule={"warmup_steps": 1},
                      checkpoint={"every": 2})
    straight = make_trainer(shards, cfg, tmp_path / "ckpt")
    straight.train()
    saved = ray.train.Checkpoint.from_directory(str(tmp_path / "ckpt" / "step_00000002"))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: saved)  # what Ray Train hands a restarted worker
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    resumed = Trainer(cfg, MODEL, TokenShardLoader(shards["train"], 4, seed=0), SEQ_LEN, checkpointer=RayCheckpointer())
    assert resumed.restore() and resumed.state.step == 2
    assert all(torch.equal(a, b) for a, b in zip(weights(straight).values(), weights(resumed).values()))
    assert os.listdir(scratch) == []


def test_nonfinite_loss_stops_without_touching_weights(shards, tmp_path):
    cfg = TrainConfig(loop={"steps": 3, "micro_batch_size": 4, "eval_every": 0, "norms_every": 0}, schedule={"warmup_steps": 1},
                      checkpoint={"every": 1})
    trainer = make_trainer(shards, cfg, tmp_path)
    trainer.train_step(iter(trainer.loader))
    before = weights(trainer)
    with torch.no_grad():
        trainer.model.norm.weight.fill_(float("nan"))
        trainer.model.norm.weight.copy_(before["norm.weight"])
    bad = iter([(torch.full((4, SEQ_LEN), 3), torch.full((4, SEQ_LEN), 3))])
    trainer.model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        trainer.train_step(bad)
    for name, value in weights(trainer).items():
        assert torch.equal(value, before[name]), name


def test_nonfinite_skip_mode_records_and_continues(shards):
    cfg = TrainConfig(loop={"steps": 3, "micro_batch_size": 4, "eval_every": 0, "norms_every": 0, "on_nonfinite": "skip"},
                      schedule={"warmup_steps": 1})
    trainer = make_trainer(shards, cfg)
    before = weights(trainer)
    handle = trainer.model.lm_head.register_forward_hook(lambda m, i, o: o * float("inf"))
    record, _ = trainer.train_step(iter(trainer.loader))
    handle.remove()
    assert record.skipped == "nonfinite" and trainer.state.skipped[0]["step"] == 1
    assert all(torch.equal(v, before[k]) for k, v in weights(trainer).items())


def test_loss_spike_is_skipped(shards):
    cfg = TrainConfig(loop={"steps": 30, "micro_batch_size": 4, "eval_every": 0, "norms_every": 0, "spike_min_window": 5, "spike_std": 3.0})
    trainer = make_trainer(shards, cfg)
    trainer.state.window = [[2.0 + 0.01 * (i % 2), 1.0] for i in range(10)]
    assert trainer._spike(2.0, 1.0) is None
    assert trainer._spike(3.0, 1.0) == "loss_spike"
    assert trainer._spike(2.0, 50.0) == "grad_norm_spike"


def test_a_lasting_grad_norm_shift_is_not_skipped_forever(shards):
    """Grad norms grow after warmup: after a few skips the window has absorbed the new level
    (skipped steps enter the window too), so training does not stall."""
    cfg = TrainConfig(loop={"steps": 40, "micro_batch_size": 4, "eval_every": 0, "norms_every": 0, "spike_min_window": 5, "spike_std": 6.0})
    trainer = make_trainer(shards, cfg)
    trainer.state.window = [[5.0, 1.0 + 0.01 * (i % 2)] for i in range(50)]
    batches = iter(trainer.loader)
    with torch.no_grad():  # make every gradient ~8x larger from now on: a lasting shift, not a spike
        trainer.model.lm_head.weight.mul_(8.0)
    records = [trainer.train_step(batches)[0] for _ in range(15)]
    skipped = [r.step for r in records if r.skipped]
    assert 1 <= len(skipped) <= 5 and records[-1].skipped is None, [(r.step, r.grad_norm, r.skipped) for r in records]


def test_checkpoint_loads_with_weights_only_and_refuses_code(shards, tmp_path):
    cfg = TrainConfig(loop={"steps": 1, "micro_batch_size": 4, "eval_every": 0, "norms_every": 0}, schedule={"warmup_steps": 0},
                      checkpoint={"every": 1})
    trainer = make_trainer(shards, cfg, tmp_path)
    trainer.train()
    path = str(tmp_path / "step_00000001")
    extra = torch.load(os.path.join(path, ckpt.extra_name(0)), weights_only=True)  # no pickled objects in the extras
    assert extra["step"] == 1
    model = ckpt.load_full_model(path)
    assert torch.equal(model.lm_head.weight, trainer.model.lm_head.weight)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    with open(os.path.join(path, ckpt.DCP_METADATA), "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ckpt.UnsafeCheckpoint, match="posix.system.*refusing to load"):
        ckpt.SafeFileSystemReader(path).read_metadata()
    with pytest.raises(BaseException, match="CheckpointException"):  # DCP wraps the refusal
        ckpt.load_full_model(path)
    assert not (tmp_path / "pwned").exists()


def test_a_run_told_to_stop_ends_after_its_next_logged_step(shards, ray_local, monkeypatch):
    """A stage that lost its lease tells its Ray Train workers to stop (a StopSignal actor): they
    stop together after the next logged step instead of training on for nothing."""
    import time

    import ray

    from pipeline.stop_signal import StopSignal
    from stages.train import launch

    monkeypatch.setattr(launch, "POLL_STOP_SIGNAL_S", 0.05)
    cfg = TrainConfig(loop={"steps": 40, "micro_batch_size": 4, "log_every": 5, "eval_every": 0, "norms_every": 0},
                      schedule={"warmup_steps": 1}, checkpoint={"every": 100})
    name = f"test-stop-{os.getpid()}"
    signal = ray.remote(num_cpus=0)(StopSignal).options(name=name).remote()
    try:
        spec = launch.TrainSpec(train=cfg, model=MODEL, seq_len=SEQ_LEN, train_files=shards["train"], stop_signal=name)
        stop_after = launch._stop_after(spec, 0, 1, torch.device("cpu"))

        def lose_the_lease_at_step_7(step: int) -> None:
            if step == 7:
                ray.get(signal.set.remote("lease on train was taken over"))
                time.sleep(0.5)  # the worker's poll sees it

        out = make_trainer(shards, cfg).train(on_step_end=lose_the_lease_at_step_7, stop_after=stop_after)
    finally:
        ray.kill(signal)
    assert out["step"] == 10 and out["stopped"] == "lease on train was taken over"
    assert make_trainer(shards, TrainConfig(loop={"steps": 2, "micro_batch_size": 4, "eval_every": 0, "norms_every": 0},
                                            schedule={"warmup_steps": 1})).train()["stopped"] is None
