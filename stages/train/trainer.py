"""The training loop. Runs in one process, under ``torchrun`` (plain ``torch.distributed``) or
under Ray Train: it only needs a process group when ``world_size > 1``, a resumable batch
iterator, and a :class:`Checkpointer` that says where checkpoints go.

Per optimizer step: ``grad_accum`` micro-batches, loss (+ optional z-loss), the global grad
norm before clipping, then a decision -- a non-finite loss or grad norm stops (or skips, if
configured), a loss or grad norm more than ``spike_std`` standard deviations above the recent
window is skipped and recorded (OLMo-core's rule) -- and only then the optimizer step. A skipped
step never touches weights or optimizer state, so a checkpoint can never hold NaNs.

After a step, the validators that are due (:class:`Validator`: validation loss per domain,
:class:`ValidationLoss`; the evaluate stage's in-loop evaluation) measure the model, and their
metrics are logged and checkpointed with the step's own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from stages.model.checkpoint import is_complete
from stages.model.transformer import ModelConfig, Transformer, count_parameters, local_tensor
from stages.train import checkpoint as ckpt
from stages.train.config import TrainConfig
from stages.train.parallelize import autocast_dtype, is_sharded, materialize, parallelize, reshard
from stages.train.steps import accumulation_steps

log = logging.getLogger("lmpipe.train")

# Dense bf16 peak FLOP/s per device, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio * lr."""
    lr, warmup, steps = cfg.optimizer.lr, cfg.schedule.warmup_steps, cfg.loop.steps
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    min_lr = lr * cfg.schedule.min_lr_ratio
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Loader(Protocol):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer(Protocol):
    def latest(self) -> ContextManager[Optional[str]]:
        """The latest complete checkpoint as a local folder, readable inside the ``with`` block
        only: a download made for it is removed when the block ends."""
    def save(self, step: int, write: Callable[[str], None], metrics: dict[str, Any]) -> Optional[str]: ...


class MetricsSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...


class Validator(Protocol):
    """Something measured on the model between optimizer steps (validation loss, the evaluate
    stage's in-loop evaluation). The trainer asks every validator after every step; ``run`` is
    called on every rank (a sharded forward is collective), in eval mode and without gradients,
    and returns the same metrics on every rank."""

    def should_run(self, step: int, last_step: int) -> bool: ...
    def run(self, trainer: "Trainer") -> dict[str, float]: ...


class LocalCheckpointer:
    """Checkpoints in ``root/step_XXXXXXXX`` on a filesystem every rank sees (one machine, NFS)."""

    def __init__(self, root: str):
        self.root = root

    @contextmanager
    def latest(self) -> Iterator[Optional[str]]:
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_") and is_complete(os.path.join(self.root, d))) \
            if os.path.isdir(self.root) else []
        yield os.path.join(self.root, done[-1]) if done else None

    def save(self, step: int, write: Callable[[str], None], metrics: dict[str, Any]) -> Optional[str]:
        path = os.path.join(self.root, f"step_{step:08d}")
        write(path)
        return path


def device_peak_flops(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def global_norm(tensors: list[torch.Tensor], sharded: bool) -> float:
    """L2 norm over all ranks' shards (FSDP) or over the local, replicated tensors."""
    sq = sum((local_tensor(t).detach().float().pow(2).sum() for t in tensors), torch.zeros((), device=tensors[0].device if tensors else "cpu"))
    if sharded and dist.is_initialized():
        dist.all_reduce(sq)
    return float(sq.sqrt())


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms (1-D) and embeddings: decay pulls them toward zero for no benefit."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or "embed_tokens" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ValidationLoss:
    """Mean token loss per domain (``val_loss/<domain>``) and their mean over domains
    (``val_loss``), every ``every`` steps and at the last, averaged over ranks; ``val_sets`` is
    what this rank scores (its share of the split, or all of it), and every rank runs the same
    number of batches.

    ``superseded_by``: a validator that reports ``val_loss`` from its own pass over the same split;
    at the steps it runs, this one does not, so the split is never scored twice."""

    def __init__(self, val_sets: dict[str, torch.Tensor], every: int, superseded_by: Optional[Validator] = None):
        self.val_sets, self.every, self.superseded_by = val_sets, every, superseded_by

    def should_run(self, step: int, last_step: int) -> bool:
        if not self.val_sets or self.every <= 0 or (step % self.every and step != last_step):
            return False
        return self.superseded_by is None or not self.superseded_by.should_run(step, last_step)

    def run(self, trainer: "Trainer") -> dict[str, float]:
        totals = []
        micro = trainer.cfg.loop.micro_batch_size
        for domain in sorted(self.val_sets):
            rows = self.val_sets[domain]
            loss_sum = torch.zeros((), device=trainer.device)
            for i in range(0, rows.shape[0], micro):
                batch = rows[i : i + micro].to(trainer.device)
                ce, _ = trainer._forward_loss(batch[:, :-1], batch[:, 1:])
                loss_sum += ce * batch.shape[0]
            totals.append(loss_sum / max(1, rows.shape[0]))
        stacked = trainer._all_mean(torch.stack(totals))
        out = {f"val_loss/{domain}": value for domain, value in zip(sorted(self.val_sets), stacked.tolist())}
        out["val_loss"] = float(stacked.mean())
        return out


@dataclass
class StepRecord:
    step: int
    loss: float
    grad_norm: float
    lr: float
    skipped: Optional[str] = None


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    clip_events: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    window: list[list[float]] = field(default_factory=list)  # recent accepted [loss, grad_norm]
    history: list[dict[str, float]] = field(default_factory=list)  # logged metrics (rank 0)
    nonfinite_in_a_row: int = 0


class Trainer:
    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, train_loader: Loader, seq_len: int,
                 validators: Sequence[Validator] = (), checkpointer: Optional[Checkpointer] = None,
                 sink: Optional[MetricsSink] = None, device: Optional[torch.device] = None, seed: int = 0):
        self.cfg, self.model_cfg, self.parallel = cfg, model_cfg, cfg.parallel
        loop = cfg.loop
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.device = device or torch.device("cpu")
        self.seq_len = seq_len
        self.loader = train_loader
        self.validators = list(validators)
        self.checkpointer = checkpointer
        self.sink = sink if self.rank == 0 else None
        self.state = TrainState()

        self.grad_accum = accumulation_steps(loop, seq_len, self.world)
        self.tokens_per_step = self.grad_accum * loop.micro_batch_size * seq_len * self.world

        if loop.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        # Shard from birth: build on meta, shard, then allocate and initialise only this rank's
        # shards (a 7B model is 27 GB in fp32; a rank holds 27 GB / world_size of it).
        with torch.device("meta"):
            model = Transformer(model_cfg)
        self.model = parallelize(model, cfg.parallel, self.device, self.world, shard=dist.is_initialized())
        materialize(self.model, self.device, seed)  # same weights whatever the world size
        self.sharded = is_sharded(self.model)
        self.autocast = autocast_dtype(self.model, cfg.parallel, self.device)
        self.num_params = count_parameters(model)
        self.flops_per_token = model_cfg.flops_per_token(seq_len)
        self.peak_flops = device_peak_flops(self.device, loop.peak_tflops * 1e12 if loop.peak_tflops else None)
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            optimizer_param_groups(self.model, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps,
            fused=True,  # one kernel per tensor list: no optimizer-sized temporaries (CPU too, since torch 2.4)
        )
        self._act_norms: dict[int, float] = {}
        self._capture_activations = False
        for i, layer in enumerate(self.model.layers):
            layer.register_forward_hook(self._activation_hook(i))

    # -- checkpoints -----------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step,
            "tokens_seen": s.tokens_seen,
            "world_size": self.world,
            "scheduler": {"step": s.step, "lr": self.cfg.optimizer.lr, "warmup_steps": self.cfg.schedule.warmup_steps, "steps": self.cfg.loop.steps},
            "loader": json.dumps(_plain(self.loader.state_dict())),
            "trainer": json.dumps({k: v for k, v in asdict(s).items() if k not in ("step", "tokens_seen")}),
        }

    def save_checkpoint(self, metrics: Optional[dict[str, Any]] = None) -> Optional[str]:
        if self.checkpointer is None:
            return None

        def write(path: str) -> None:
            ckpt.save(path, self.model, self.optimizer, self._extra_state(), self.model_cfg, self.rank)

        return self.checkpointer.save(self.state.step, write, {"tokens_seen": self.state.tokens_seen, **(metrics or {})})

    def restore(self, path: Optional[str] = None, storage: Any = None) -> bool:
        """Continue exactly from a checkpoint: ``path`` (a local folder, or an ``s3://`` prefix
        read in place through ``storage``), else the checkpointer's latest; False when there is none.

        A checkpoint written by another number of workers is taken when the loader's state is a
        position in a world-size-independent order (``loader.resumes_on_any_world_size``): DCP
        reads each rank's part of the model and optimizer state from the saved shards whatever
        their sharding, and every rank takes the extras (step, loader position, trainer state: the
        same on every rank) of a rank that existed. Per-rank RNG states are restored only on the
        same number of workers (the loop draws no random numbers after initialisation)."""
        if path is not None:
            return self._restore_from(path, storage)
        if self.checkpointer is None:
            return False
        with self.checkpointer.latest() as latest:
            return latest is not None and self._restore_from(latest, None)

    def _restore_from(self, path: str, storage: Any) -> bool:
        from stages.model.checkpoint import load_extra, load_model_config, model_mismatch

        mismatch = model_mismatch(path, load_model_config(path, storage), self.model_cfg)
        if mismatch:
            raise RuntimeError(mismatch)
        saved_world = load_extra(path, 0, storage)["world_size"]
        if saved_world != self.world and not getattr(self.loader, "resumes_on_any_world_size", False):
            raise RuntimeError(f"{path} was written by {saved_world} workers; this run has {self.world}, and its loader "
                               "cannot continue another number of workers' order")
        extra = ckpt.load(path, self.model, self.optimizer, self.rank if self.rank < saved_world else 0,
                          restore_rng=saved_world == self.world, storage=storage)
        self.loader.load_state_dict(json.loads(extra["loader"]))
        if saved_world != self.world:
            log.info("[rank %d] %s was written by %d workers; continuing its data order on %d", self.rank, path, saved_world, self.world)
        trainer = json.loads(extra["trainer"])
        self.state = TrainState(step=extra["step"], tokens_seen=extra["tokens_seen"], **trainer)
        log.info("[rank %d] resumed from %s at step %d", self.rank, path, self.state.step)
        return True

    # -- one step ----------------------------------------------------------------------------------
    def _activation_hook(self, index: int):
        def hook(module, inputs, output):
            if self._capture_activations:
                self._act_norms[index] = float(output.detach().float().pow(2).mean().sqrt())
        return hook

    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            logits = self.model(inputs)
        logits = logits.float()
        ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        z = torch.logsumexp(logits, dim=-1).pow(2).mean() if self.cfg.loop.z_loss > 0 else torch.zeros((), device=logits.device)
        return ce, z

    def _all_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    def _spike(self, loss: float, grad_norm: float) -> Optional[str]:
        cfg, window = self.cfg.loop, self.state.window
        if cfg.spike_std <= 0 or len(window) < cfg.spike_min_window:
            return None
        for i, (name, value) in enumerate((("loss", loss), ("grad_norm", grad_norm))):
            xs = [w[i] for w in window]
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
            if value > mean + cfg.spike_std * max(std, 1e-8):
                return f"{name}_spike"
        return None

    def train_step(self, batches: Iterator) -> tuple[StepRecord, float]:
        """One optimizer step; returns its record and the seconds spent waiting for data."""
        cfg, step = self.cfg.loop, self.state.step
        data_wait = 0.0
        ce_sum = torch.zeros((), device=self.device)
        self._capture_activations = cfg.norms_every > 0 and (step + 1) % cfg.norms_every == 0
        for micro in range(self.grad_accum):
            if self.sharded and self.grad_accum > 1:
                # reduce-scatter once per step, on the last micro-batch (FSDP2 accumulates the
                # unsharded gradients until then)
                self.model.set_requires_gradient_sync(micro == self.grad_accum - 1)
            t = time.perf_counter()
            inputs, targets = next(batches)
            data_wait += time.perf_counter() - t
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            ce, z = self._forward_loss(inputs, targets)
            ((ce + cfg.z_loss * z) / self.grad_accum).backward()
            ce_sum += ce.detach()
            self._capture_activations = False  # the first micro-batch is enough
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm_t = torch.nn.utils.get_total_norm(grads, 2.0)
        if hasattr(grad_norm_t, "full_tensor"):
            grad_norm_t = grad_norm_t.full_tensor()
        loss = float(self._all_mean(ce_sum / self.grad_accum))
        grad_norm = float(grad_norm_t)
        lr = lr_at(self.cfg, step)

        reason = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = "nonfinite"
            self.state.nonfinite_in_a_row += 1
            message = f"step {step + 1}: non-finite loss {loss} or grad norm {grad_norm}"
            if cfg.on_nonfinite == "stop" or self.state.nonfinite_in_a_row > cfg.max_nonfinite_skips:
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(f"{message}; stopping before the optimizer step (weights and checkpoints are untouched; "
                                    f"the last good checkpoint is step {self._last_checkpoint_step()})")
            log.warning("%s: skipping the step", message)
        else:
            self.state.nonfinite_in_a_row = 0
            reason = self._spike(loss, grad_norm)

        if reason is None:
            clip = self.cfg.optimizer.grad_clip
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(grads, clip, grad_norm_t)
                if grad_norm > clip:
                    self.state.clip_events += 1
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        if math.isfinite(loss) and math.isfinite(grad_norm):
            # every finite step enters the window, skipped ones too: a lasting shift (grad norms grow
            # after warmup) is absorbed within a few steps instead of being skipped forever
            self.state.window.append([loss, grad_norm])
            del self.state.window[: max(0, len(self.state.window) - cfg.spike_window)]
        if reason is not None:
            self.state.skipped.append({"step": step + 1, "loss": loss, "grad_norm": grad_norm, "reason": reason})
            if reason != "nonfinite":
                log.warning("step %d: %s (loss %.4f, grad norm %.3f): skipped", step + 1, reason, loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return StepRecord(step + 1, loss, grad_norm, lr, reason), data_wait

    def _last_checkpoint_step(self) -> int:
        every = self.cfg.checkpoint.every
        return (self.state.step // every) * every

    # -- validation and norms ------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, validators: Sequence[Validator]) -> dict[str, float]:
        """Run ``validators`` (on every rank) and merge their metrics."""
        self.model.eval()
        out: dict[str, float] = {}
        for validator in validators:
            out.update(validator.run(self))
        if self.sharded:
            reshard(self.model)
        self.model.train()
        return out

    def norms(self) -> dict[str, float]:
        params = list(self.model.parameters())
        out = {"param_norm": global_norm(params, self.sharded)}
        for key in ("exp_avg", "exp_avg_sq"):
            states = [s[key] for s in self.optimizer.state.values() if key in s]
            if states:
                out[f"optim_{key}_norm"] = global_norm(states, self.sharded)
        if self._act_norms:
            values = torch.tensor([self._act_norms[i] for i in sorted(self._act_norms)], device=self.device)
            for i, v in zip(sorted(self._act_norms), self._all_mean(values).tolist()):
                out[f"activation_rms/layer_{i:02d}"] = v
            self._act_norms.clear()
        return out

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self, on_step_end: Optional[Callable[[int], None]] = None,
              stop_after: Optional[Callable[[int], Optional[str]]] = None) -> dict[str, Any]:
        """Train to ``loop.steps``. ``on_step_end(step)`` is called once a step is logged and
        checkpointed: where the tests inject a worker's death. ``stop_after(step)``: a reason to
        stop training after this step, or None; every rank must get the same answer at the same
        step (it may be collective); training then ends early, with ``stopped`` set."""
        cfg = self.cfg.loop
        self.model.train()
        batches = iter(self.loader)
        started = time.perf_counter()
        first_step = self.state.step
        window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
        last: dict[str, float] = {}
        if self.rank == 0:
            log.info("training %s parameters (%.2f GFLOP/token) on %d x %s: %d steps of %d tokens (%d micro-batches of %d x %d per rank)",
                     f"{self.num_params:,}", self.flops_per_token / 1e9, self.world, self.device.type, cfg.steps,
                     self.tokens_per_step, self.grad_accum, cfg.micro_batch_size, self.seq_len)
        while self.state.step < cfg.steps:
            record, wait = self.train_step(batches)
            step = record.step
            window_wait += wait
            window_steps += 1
            metrics: dict[str, float] = {}
            if step % cfg.log_every == 0 or step == cfg.steps or step == 1:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_t
                step_time = elapsed / window_steps
                tps = self.tokens_per_step / step_time
                metrics = {
                    "loss": record.loss, "lr": record.lr, "grad_norm": record.grad_norm,
                    "clip_events": self.state.clip_events, "skipped_steps": len(self.state.skipped),
                    "tokens_seen": self.state.tokens_seen, "tokens_per_second": tps,
                    "tokens_per_second_per_device": tps / self.world, "step_time": step_time,
                    "data_wait": window_wait / window_steps, "peak_memory_bytes": peak_memory_bytes(self.device),
                }
                if self.peak_flops:
                    metrics["mfu"] = tps / self.world * self.flops_per_token / self.peak_flops
                eta = (time.perf_counter() - started) / max(1, step - first_step) * (cfg.steps - step)
                if self.rank == 0:
                    mfu = f"{metrics['mfu'] * 100:.1f}%" if "mfu" in metrics else "n/a"
                    log.info("step %d/%d | loss %.4f | lr %.2e | gnorm %.3f | %s tok/s | MFU %s | %.3fs/step (data %.3fs) | ETA %s%s",
                             step, cfg.steps, record.loss, record.lr, record.grad_norm, f"{tps:,.0f}", mfu, step_time,
                             metrics["data_wait"], _hms(eta), f" | skipped: {record.skipped}" if record.skipped else "")
                window_t, window_wait, window_steps = time.perf_counter(), 0.0, 0
            if cfg.norms_every > 0 and step % cfg.norms_every == 0:
                metrics.update(self.norms())
            due = [v for v in self.validators if v.should_run(step, cfg.steps)]
            if due:
                metrics.update(self.validate(due))
                metrics["tokens_seen"] = self.state.tokens_seen  # validation curves are plotted against tokens too
                if self.rank == 0 and "val_loss" in metrics:
                    log.info("step %d | validation loss %s", step, ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items() if k.startswith("val_loss")))
            if metrics:
                last.update(metrics)
                if self.rank == 0:
                    self.state.history.append({"step": step, **{k: v for k, v in metrics.items() if k in ("loss", "val_loss", "lr")}})
                if self.sink is not None:
                    self.sink.log(step, metrics)
            if step % self.cfg.checkpoint.every == 0 or step == cfg.steps:
                self.save_checkpoint({k: v for k, v in last.items() if k in ("loss", "val_loss")})
            if on_step_end is not None:
                on_step_end(step)
            if stop_after is not None and (stopped := stop_after(step)):
                if self.rank == 0:
                    log.warning("training stops after step %d of %d: %s", step, cfg.steps, stopped)
                break
        else:
            stopped = None
        return {"step": self.state.step, "stopped": stopped, "tokens_seen": self.state.tokens_seen, "skipped": self.state.skipped,
                "clip_events": self.state.clip_events, "last": last, "history": self.state.history,
                "num_params": self.num_params, "flops_per_token": self.flops_per_token}


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _plain(obj: Any) -> Any:
    """A loader state as JSON-able values (numpy scalars and arrays become ints and lists)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
