"""Launching the training loop: on Ray Train workers (``launch_ray``), or in any process that
already knows its rank (``run_training``: one process, or under ``torchrun``). Ray only
launches; everything that trains lives in :mod:`stages.train.trainer`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Protocol

import torch

from pipeline import storage as st
from pipeline.stop_signal import StopSignal
from stages.model.transformer import ModelConfig
from stages.train.config import ClusterConfig, TrainConfig
from stages.train.data import rank_share, read_validation
from stages.train.trainer import Checkpointer, MetricsSink, Trainer, ValidationLoss, Validator

log = logging.getLogger("lmpipe.train")


@dataclass(frozen=True)
class FaultInjection:
    """For tests: rank ``rank`` kills its own process after step ``step``, once (``marker`` records it)."""

    step: int
    marker: str
    rank: int = 1
    delay_s: float = 3.0


class InLoopEvalSpec(Protocol):
    """The in-loop evaluation as the stage hands it to every rank (:class:`stages.scoring.hook.InLoopEvalSpec`,
    built on the driver: workers never fetch tasks or tokenizers themselves). A protocol, not an
    import: the training code does not depend on the evaluation package."""

    validation: bool  # it scores the validation split, and reports val_loss from that pass

    def validator(self, validation: dict[str, torch.Tensor]) -> Validator: ...


class CheckpointEvalSpec(Protocol):
    """The checkpoint evaluation (:class:`stages.scoring.checkpoint_eval.CheckpointEvaluator`,
    built on the driver): called with each committed checkpoint in a Ray task of its own. A
    protocol, not an import: the training code does not depend on the evaluation package."""

    num_cpus: float
    num_gpus: float
    timeout_s: Optional[float]

    def __call__(self, checkpoint: str, step: int, tokens_seen: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class TrainSpec:
    """Everything a worker needs; pickled to every Ray Train worker."""

    train: TrainConfig
    model: ModelConfig
    seq_len: int
    train_files: list[str]
    val_files: list[str] = field(default_factory=list)
    val_domains: tuple[str, ...] = ()  # the validation split's sources (the tokenize summary's), to stop reading early
    seed: int = 0  # model init and data order
    storage: st.Storage = st.Storage()
    metrics: Optional[MetricsSink] = None  # the stage's MLflow run (pipeline.tracking.RunLogger); rank 0 logs to it
    threads_per_worker: Optional[int] = None
    fault: Optional[FaultInjection] = None
    in_loop_eval: Optional[InLoopEvalSpec] = None
    stop_signal: Optional[str] = None  # the name of the run's StopSignal actor (launch_ray sets it)


def _fault_hook(fault: Optional[FaultInjection], rank: int):
    if fault is None or rank != fault.rank:
        return None

    def hook(step: int) -> None:
        if step == fault.step and not os.path.exists(fault.marker):
            with open(fault.marker, "w") as f:
                f.write(f"rank {rank} killed itself after step {step}\n")
            log.warning("fault injection: rank %d exits after step %d", rank, step)
            # Ray Train's controller collects reported checkpoints when it polls the workers
            # (every 2 s); a worker that dies sooner after a report can lose that checkpoint.
            time.sleep(fault.delay_s)
            os._exit(1)

    return hook


POLL_STOP_SIGNAL_S = 2.0


def _stop_after(spec: TrainSpec, rank: int, world_size: int, device: torch.device) -> Optional[Callable[[int], Optional[str]]]:
    """The trainer's ``stop_after``: a thread of this worker polls the run's StopSignal; at each
    logged step every rank learns whether any rank has seen it (one all-reduce of one number, so
    that all ranks stop after the same step: a rank that stopped alone would hang the others'
    collectives)."""
    if spec.stop_signal is None:
        return None
    import threading

    import ray

    signal = ray.get_actor(spec.stop_signal)
    seen: dict[str, Optional[str]] = {"reason": None}

    def poll() -> None:
        while seen["reason"] is None:
            try:
                seen["reason"] = ray.get(signal.get.remote(), timeout=30)
            except Exception:  # the driver is gone or slow: its run ends anyway; keep training meanwhile
                pass
            time.sleep(POLL_STOP_SIGNAL_S)

    threading.Thread(target=poll, name="lmpipe stop signal", daemon=True).start()
    every = spec.train.loop.log_every

    def stop_after(step: int) -> Optional[str]:
        if step % every != 0:
            return None
        flag = torch.tensor([1.0 if seen["reason"] else 0.0], device=device)
        if world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0.0:
            return None
        return seen["reason"] or "another rank was told to stop"

    return stop_after


def validators(spec: TrainSpec, validation: dict[str, torch.Tensor], rank: int, world_size: int) -> list[Validator]:
    """Validation loss every ``loop.eval_every`` steps, and the in-loop evaluation (every rank
    scores the same sequences and questions: a sharded model's forward is collective). Where the
    in-loop evaluation scores the split, its pass gives the validation loss too and the loss
    validator skips those steps; it then scores the same full split at its own steps, so that
    ``val_loss`` is one series over one set of sequences (a rank's share drops the sequences that
    do not divide evenly over the ranks). Without it, each rank scores its share."""
    ev = spec.in_loop_eval
    every = spec.train.loop.eval_every
    if ev is None or not ev.validation:
        loss = ValidationLoss(rank_share(validation, rank, world_size), every)
        return [loss] if ev is None else [loss, ev.validator(validation)]
    in_loop = ev.validator(validation)
    return [ValidationLoss(validation, every, superseded_by=in_loop), in_loop]


def run_training(spec: TrainSpec, rank: int, world_size: int, device: torch.device, checkpointer: Optional[Checkpointer]) -> dict[str, Any]:
    """Build loader, validators and trainer on this rank, resume if a checkpoint exists, train."""
    from stages.train.steps import train_loader

    if spec.threads_per_worker:
        torch.set_num_threads(spec.threads_per_worker)
    loop = spec.train.loop
    loader = train_loader(loop, spec.train_files, rank, world_size, spec.seed, spec.storage)
    validation = read_validation(spec.val_files, spec.storage, loop.eval_max_sequences, spec.val_domains)
    sink = spec.metrics if rank == 0 else None
    trainer = Trainer(spec.train, spec.model, loader, spec.seq_len, validators(spec, validation, rank, world_size),
                      checkpointer=checkpointer, sink=sink, device=device, seed=spec.seed)
    resume_from = spec.train.checkpoint.resume_from
    if not trainer.restore() and resume_from:  # this run's own checkpoints come first: a restart continues them
        trainer.restore(resume_from, spec.storage)
    return trainer.train(on_step_end=_fault_hook(spec.fault, rank), stop_after=_stop_after(spec, rank, world_size, device))


def ray_train_worker(config: dict[str, Any]) -> None:
    """The Ray Train loop (one call per worker; Ray has set up the process group)."""
    import ray.train
    import ray.train.torch


    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec: TrainSpec = config["spec"]
    context = ray.train.get_context()
    checkpointer = RayCheckpointer(evaluate=config.get("evaluate_checkpoints", False), evaluation_timeout_s=config.get("evaluation_timeout_s"))
    run_training(spec, context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(), checkpointer)


def launch_ray(spec: TrainSpec, cluster: ClusterConfig, *, storage_path: str, name: str, storage: Optional[st.Storage] = None,
               must_stop: Optional[Callable[[], Optional[str]]] = None, checkpoint_eval: Optional[CheckpointEvalSpec] = None):
    """Run ``ray_train_worker`` on ``cluster.num_workers`` workers. Re-running with the same
    ``storage_path`` and ``name`` resumes from the latest checkpoint; a failed worker group is
    restarted from it up to ``cluster.max_failures`` times; Ray Train keeps the latest
    ``spec.train.checkpoint.keep`` checkpoints. ``must_stop()``: polled while training runs; once
    it gives a reason, the workers stop after their next logged step. Returns Ray Train's
    ``Result``.

    ``checkpoint_eval``: Ray Train's checkpoint validation calls it with every checkpoint once
    all workers have reported it, in a Ray task with its own resources (one at a time, queued;
    training never waits for it); its metrics join the checkpoint's in the ``Result``, and
    ``fit`` returns once the queued ones have run (each within ``timeout_s``)."""
    import dataclasses
    import threading
    import uuid

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, ValidationConfig, ValidationTaskConfig
    from ray.train.torch import TorchTrainer

    fs = None
    path = storage_path
    if st.is_remote(storage_path):
        fs, path = (storage or st.Storage()).arrow_fs(storage_path)
    signal = watcher = None
    done = threading.Event()
    if must_stop is not None:
        signal_name = f"lmpipe-stop-{name}-{uuid.uuid4().hex[:8]}"
        signal = ray.remote(num_cpus=0)(StopSignal).options(name=signal_name).remote()
        spec = dataclasses.replace(spec, stop_signal=signal_name)

        def watch() -> None:
            while not done.wait(1.0):
                reason = must_stop()
                if reason:
                    log.warning("stopping the Ray Train run %s after its next logged step: %s", name, reason)
                    signal.set.remote(reason)
                    return

        watcher = threading.Thread(target=watch, name="lmpipe train watcher", daemon=True)
        watcher.start()
    validation = None
    if checkpoint_eval is not None:
        remote = {"num_cpus": checkpoint_eval.num_cpus, "max_retries": 0}  # a job that fails fails again: one line, no retry
        if checkpoint_eval.num_gpus:
            remote["num_gpus"] = checkpoint_eval.num_gpus
        scheme = storage_path.split("://", 1)[0] if st.is_remote(storage_path) else None
        validation = ValidationConfig(fn=_ScoreReportedCheckpoint(checkpoint_eval, scheme),
                                      task_config=ValidationTaskConfig(timeout_s=checkpoint_eval.timeout_s), ray_remote_kwargs=remote)
    trainer = TorchTrainer(
        ray_train_worker,
        validation_config=validation,
        train_loop_config={"spec": spec, "evaluate_checkpoints": checkpoint_eval is not None,
                           "evaluation_timeout_s": checkpoint_eval.timeout_s if checkpoint_eval is not None else None},
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker=dict(cluster.resources_per_worker)),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.checkpoint.keep),
        ),
    )
    try:
        return trainer.fit()
    finally:
        done.set()
        if signal is not None:
            ray.kill(signal)


@dataclass(frozen=True)
class _ScoreReportedCheckpoint:
    """Ray Train's validation function: the checkpoint Ray hands over, as the URI the train stage
    records (Ray gives remote paths without their scheme), to the checkpoint evaluation."""

    evaluate: CheckpointEvalSpec
    scheme: Optional[str]

    def __call__(self, checkpoint, step: int = 0, tokens_seen: int = 0) -> dict[str, Any]:
        path = checkpoint.path
        uri = f"{self.scheme}://{path}" if self.scheme and "://" not in path else path
        return self.evaluate(uri, step, tokens_seen)


class RayCheckpointer:
    """Each rank writes its shards into a local folder and reports it; Ray Train merges the
    folders into one persisted checkpoint (local or s3) and hands the latest back on restart.
    With ``evaluate``, each report asks for the checkpoint's evaluation (``launch_ray``'s
    ``checkpoint_eval``) with its step and tokens seen."""

    def __init__(self, evaluate: bool = False, evaluation_timeout_s: Optional[float] = None):
        self.evaluate, self.evaluation_timeout_s = evaluate, evaluation_timeout_s

    @contextmanager
    def latest(self) -> Iterator[Optional[str]]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        # local storage: the folder itself, read in place; s3: one download per node, which Ray
        # removes when the last process on the node leaves the block (a copy kept after the
        # restore would be a full checkpoint, optimizer state included, per rank per restart)
        with checkpoint.as_directory() as d:
            yield d

    def save(self, step: int, write: Callable[[str], None], metrics: dict[str, Any]) -> Optional[str]:
        import ray.train

        local = tempfile.mkdtemp(prefix=f"lmpipe-ckpt-{step}-")
        try:
            write(local)
            # a report's own task config replaces the default's timeout as well as its arguments
            validation = ray.train.ValidationTaskConfig(fn_kwargs={"step": step, "tokens_seen": int(metrics.get("tokens_seen", 0))},
                                                        timeout_s=self.evaluation_timeout_s) if self.evaluate else False
            ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(local), validation=validation)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return None
