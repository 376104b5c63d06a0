"""The train stage's configuration, one pydantic model per component of the training code.

Every setting is declared here once, with its one default: the stage validates YAML into these
models and hands the same objects to the code that consumes them (``Trainer``, ``parallelize``,
``launch_ray``), so a default cannot differ between the stage and the loop.

:class:`TrainConfig` is what every training rank needs (optimizer, schedule, loop, parallel,
checkpoint); :class:`TrainStageConfig` adds what only the driver needs (the model's named shape,
the cluster, in-loop evaluation, the export). In YAML::

    config:
      model: {size: debug}
      optimizer: {lr: 3.0e-4, weight_decay: 0.1}
      schedule: {warmup_steps: 10, min_lr_ratio: 0.1}
      loop: {steps: 300, micro_batch_size: 8, eval_every: 50}
      checkpoint: {every: 100}
      cluster: {num_workers: 2}

This module must not import torch: the registry imports every stage's config to list and validate
pipelines (``lmpipe stages``, ``lmpipe explain``, and ``lmpipe run`` before any work starts), and
torch alone costs seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Optional

from pydantic import Field, model_validator

from pipeline.config import PathStr, PerformanceField, StrictModel
from stages.scoring.batching import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_SIZE
from stages.scoring.entries import TaskEntry, TextSetEntry

if TYPE_CHECKING:
    from stages.model.transformer import ModelConfig


class ModelSpec(StrictModel):
    """A named shape, optionally overridden field by field; vocabulary and sequence length come from the tokenize stage."""

    # Every shape these allow exports to Hugging Face (stages/model/hf.py maps each norm/QK-norm
    # combination to an exact transformers architecture), so no refusal can come after training.
    size: Literal["debug", "125m", "350m", "1b", "llama-1b", "tinyllama-1b", "7b"] = Field(
        default="debug", description="a named shape (stages/model/transformer.py)")
    dim: Optional[int] = Field(default=None, ge=8)
    n_layers: Optional[int] = Field(default=None, ge=1)
    n_heads: Optional[int] = Field(default=None, ge=1)
    n_kv_heads: Optional[int] = Field(default=None, ge=1)
    ffn_dim: Optional[int] = Field(default=None, ge=1)
    norm: Optional[Literal["rmsnorm", "layernorm"]] = None
    qk_norm: Optional[bool] = None
    tie_embeddings: Optional[bool] = None
    rope_theta: Optional[float] = Field(default=None, gt=0)
    vocab_multiple_of: int = Field(default=64, ge=1, description="pad the vocabulary to a multiple of this (faster matmuls)")

    def build(self, vocab_size: int, seq_len: int) -> "ModelConfig":
        from stages.model.transformer import model_config

        overrides = {k: v for k, v in self.model_dump(exclude={"size", "vocab_multiple_of"}).items() if v is not None}
        padded = -(-vocab_size // self.vocab_multiple_of) * self.vocab_multiple_of
        return model_config(self.size, vocab_size=padded, max_seq_len=seq_len, **overrides)


Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimizerConfig(StrictModel):
    """AdamW, with the global gradient norm clipped before each step."""

    lr: float = Field(default=3e-4, gt=0, description="peak learning rate (the schedule scales it)")
    # AdamW refuses a beta outside [0, 1), but only once the workers build it, after the upstream stages ran
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.95), description="AdamW (beta1, beta2), each in [0, 1)")
    eps: float = Field(default=1e-8, gt=0, description="AdamW epsilon")
    weight_decay: float = Field(default=0.1, ge=0, description="decoupled weight decay on matrices; norms and embeddings get none")
    grad_clip: float = Field(default=1.0, ge=0, description="clip the global gradient norm to this; 0 disables clipping")


class ScheduleConfig(StrictModel):
    """Learning rate: linear warmup to optimizer.lr, then cosine decay to min_lr_ratio * lr at loop.steps."""

    warmup_steps: int = Field(default=10, ge=0, description="steps of linear warmup; must be < loop.steps")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="final learning rate as a fraction of optimizer.lr")


class LoopConfig(StrictModel):
    """Steps and batches, the objective, the rules for bad steps, and monitoring cadence."""

    steps: int = Field(default=300, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(default=8, ge=1, description="sequences per worker per forward/backward")
    global_batch_tokens: Optional[int] = Field(default=None, ge=1, description="tokens per optimizer step (gradient accumulation reaches it); default one micro-batch per worker")
    z_loss: float = Field(default=0.0, ge=0, description="weight of mean(logsumexp(logits)^2) added to the loss (PaLM: 1e-4)")
    spike_std: float = Field(default=6.0, ge=0, description="skip a step whose loss or grad norm exceeds mean + spike_std * std of the recent window; 0 disables")
    spike_window: int = Field(default=100, ge=2, description="recent steps the spike rule compares against")
    spike_min_window: int = Field(default=20, ge=2, description="steps seen before the spike rule applies")
    on_nonfinite: Literal["stop", "skip"] = Field(default="stop", description="a NaN/inf loss or grad norm: stop before the optimizer step, or skip the step")
    max_nonfinite_skips: int = Field(default=10, ge=0, description="with on_nonfinite: skip, stop after this many non-finite steps in a row")
    log_every: int = Field(default=10, ge=1, description="log loss, throughput and MFU every N steps")
    norms_every: int = Field(default=50, ge=0, description="log parameter, optimizer-state and activation norms every N steps; 0: never")
    eval_every: int = Field(default=50, ge=0, description="validation loss every N steps and at the last; 0: never")
    eval_max_sequences: int = Field(default=64, ge=1, description="validation sequences per domain, over all workers")
    peak_tflops: Optional[float] = Field(default=None, gt=0, description="device peak for MFU; default from the GPU name (H100 989, A100 312)")
    deterministic: bool = Field(default=True, description="deterministic kernels on CPU, so a resumed run equals an uninterrupted one; GPUs ignore it")
    loader_streams: int = Field(default=64, ge=1, description=(
        "the training loader's canonical streams (stages/tokenize/loader.py): the data order depends on this, never on the "
        "number of workers, and a checkpoint resumes on any number of workers that divides it"))
    shuffle_window: int = Field(default=1024, ge=1, description="sequences shuffled together within a loader stream")


class ParallelConfig(StrictModel):
    """How ``parallelize`` turns the single-device model into the trained one (FSDP2 whenever there are several workers)."""

    activation_checkpointing: bool = Field(default=False, description="recompute each block's activations in backward (memory for ~30% more compute)")
    compile: bool = Field(default=False, description="torch.compile each transformer block")
    # bf16 gradient all-reduce loses precision (the OLMo team saw it), so reduction stays fp32 whatever this says
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="parameter/compute dtype: auto is bf16 on GPU and fp32 on CPU (exact CPU tests); gradients reduce in fp32")


class CheckpointConfig(StrictModel):
    """Sharded checkpoints (also written at the last step); Ray Train persists them and resumes from the latest."""

    every: int = Field(default=100, ge=1, description="checkpoint every N steps")
    keep: Optional[int] = Field(default=None, ge=1, description="checkpoints Ray Train keeps (default: all)")
    resume_from: Optional[PathStr] = Field(default=None, description=(
        "a checkpoint of another run (a folder with model_config.json, local or s3://) to continue: model, optimizer, "
        "step and data order, on any number of workers that divides loop.loader_streams; used when this stage's own "
        "Ray Train run has no checkpoint yet"))


class ClusterConfig(StrictModel):
    """The Ray Train worker group."""

    num_workers: int = Field(default=2, ge=1, description="training workers (FSDP ranks)")
    use_gpu: bool = Field(default=False, description="one GPU per worker")
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0}, description="Ray resources per worker")
    threads_per_worker: Optional[int] = Field(default=None, ge=1, description="torch threads per worker (default: its CPUs)")
    max_failures: int = Field(default=2, ge=0, description="restarts of a failed worker group, each from the latest checkpoint")

    def worker_threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.resources_per_worker.get("CPU", 1)))


class InLoopEvalConfig(StrictModel):
    """Evaluation inside the training loop (``stages/scoring/hook.py``), logged to this stage's
    MLflow run at the training step: ``eval/bits_per_byte/<domain>`` on the tokenize stage's
    validation split and ``eval/<task>_<shots>shot/acc`` / ``acc_norm`` / ``gold_bits_per_byte`` on a multiple-choice task,
    with the evaluate stage's scoring. Its pass over the validation split also gives ``val_loss``
    at its steps, so the loop's own validation loss (``loop.eval_every``) skips those steps."""

    every: int = Field(default=100, ge=1, description="evaluate every N optimizer steps, and at the last step")
    validation: bool = Field(default=True, description="bits per byte per domain on the validation split (loop.eval_max_sequences per domain)")
    task: Optional[str] = Field(default="mmlu", description="a built-in task (mmlu) or a name for the file in task_path; null: no task")
    task_path: Optional[PathStr] = Field(default=None, description="JSONL task file (id, context, choices, gold), local or s3://")
    shots: int = Field(default=0, ge=0)
    limit: Optional[int] = Field(default=100, ge=1, description="questions per evaluation, spread evenly over the task")
    prompt: Optional[Literal["plain", "mmlu"]] = Field(default=None, description="default mmlu for the built-in mmlu, else plain")

    @model_validator(mode="after")
    def _something(self):
        if not self.validation and self.task is None:
            raise ValueError("in_loop_eval needs validation: true or a task")
        return self


class CheckpointEvalConfig(StrictModel):
    """Each checkpoint scored as it commits, by a Ray task of its own (Ray Train's checkpoint
    validation: its own CPUs or GPU, never a training worker's; one at a time, queued; training
    does not wait). The entries and settings are the evaluate stage's, and so are the jobs: each
    result is stored beside its checkpoint under the job's fingerprint, and an evaluate stage
    that asks for the same job on the same checkpoint (same entries, dtype, device, batching,
    code) reads it instead of scoring again. Metrics go to this stage's MLflow run at the
    checkpoint's step (``checkpoint_eval/<task>/<metric>``); a failing evaluation is one warning
    line and a record in the summary, never a failed training."""

    tasks: list[TaskEntry] = Field(default_factory=list, description="multiple-choice tasks, as the evaluate stage's tasks")
    validation: bool = Field(default=True, description="bits per byte per source on the tokenize stage's validation split")
    validation_max_sequences: Optional[int] = Field(default=256, ge=1, description="per source (None: all)")
    text_sets: list[TextSetEntry] = Field(default_factory=list, description="held-out text, as the evaluate stage's text_sets")
    use_gpu: bool = Field(default=False, description="one GPU per evaluation task (else CPUs)")
    cpus_per_task: float = Field(default=1.0, gt=0, description="CPUs of the evaluation task (its torch threads)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    batch_tokens: int = Field(default=DEFAULT_BATCH_TOKENS, ge=64, description="tokens per forward pass (padded batch size x length)")
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1)
    share_context: bool = Field(default=True, description="score all choices of a question in one forward pass")
    timeout_s: Optional[float] = Field(default=3600.0, gt=0, description="a checkpoint's evaluation is cancelled after this (None: no limit)")

    @model_validator(mode="after")
    def _something(self):
        if not (self.tasks or self.validation or self.text_sets):
            raise ValueError("checkpoint_eval needs tasks, text_sets or validation: true")
        return self


class TrainConfig(StrictModel):
    """What the training loop consumes on every rank (``Trainer``); passed to the workers as is."""

    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _check(self):
        # a rule across components has no single field to point at, so the message names both paths
        if self.schedule.warmup_steps >= self.loop.steps:
            raise ValueError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be < loop.steps ({self.loop.steps})")
        return self


class TrainStageConfig(TrainConfig):
    """The train stage: the loop's configuration plus what the driver resolves or launches."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    in_loop_eval: Optional[InLoopEvalConfig] = Field(default=None, description="bits per byte and a task inside the loop (default: off)")
    # outside the fingerprint: it scores checkpoints, it never changes one (nor the checkpoint table
    # or the export), so turning it on or off never retrains; it takes effect when training runs
    checkpoint_eval: Optional[CheckpointEvalConfig] = PerformanceField(None, description="each checkpoint scored by a Ray task as it commits (default: off)")
    export_dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="dtype of the Hugging Face export")

    @model_validator(mode="after")
    def _workers_divide_streams(self):
        # caught here, not after the Ray Train workers have started and read their shards
        if self.loop.loader_streams % self.cluster.num_workers:
            raise ValueError(f"cluster.num_workers ({self.cluster.num_workers}) must divide loop.loader_streams "
                             f"({self.loop.loader_streams}): each worker reads whole loader streams")
        return self
