"""``train``: pretrain a LLaMA-style model on the tokenize stage's shards with Ray Train + FSDP2.

The stage (on the driver) turns its config (:mod:`stages.train.config`: model, optimizer,
schedule, loop, parallel, checkpoint, cluster) into a :class:`~stages.train.launch.TrainSpec`, runs
it on ``cluster.num_workers`` Ray Train workers, then exports the final checkpoint to Hugging Face
format (streamed by a task on a worker: :mod:`stages.train.export`) and records the result. Ray Train keeps its checkpoints in this stage's own folder
(``RunConfig(storage_path=<stage folder>, name=ray-train-<id>)``, see :func:`ray_train_run`), so:

* a failed worker group restarts from the latest checkpoint (``cluster.max_failures`` times),
* rerunning a stage that did not finish (crash, Ctrl-C, lost driver) resumes from its latest
  checkpoint: same config, same fingerprint, same Ray Train run, and
* ``--force`` (or ``--stage``) starts a new Ray Train run, from step 0 -- or from
  ``checkpoint.resume_from``, another run's checkpoint, on any number of workers that divides
  ``loop.loader_streams``; the summary, the manifest's external inputs and the MLflow model
  record which checkpoint it came from.

Outputs: ``data`` lists the checkpoints Ray kept (step, tokens seen, path, losses) for the
evaluation stage; its :class:`~stages.summaries.train.TrainSummary` holds the export folder, the
final checkpoint and the model's shape. The MLflow stage run gets per-step metrics from rank 0, a loss-curve PNG and a
LoggedModel (the export) linked to the token shards it was trained on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import pyarrow as pa

from pipeline import manifest as mf
from pipeline import storage as st
from pipeline.context import ExternalInput
from pipeline.registry import register
from pipeline.stage import DatasetStage, Resources
from pipeline.tracking import DatasetRef, ModelRecord
from stages.summaries.tokenize import TokenizeSummary
from stages.train.config import TrainStageConfig
from stages.summaries.train import CheckpointEvaluation, ResumedFrom, TrainSummary

if TYPE_CHECKING:
    from stages.scoring.checkpoint_eval import CheckpointEvaluator
    from stages.scoring.hook import InLoopEvalSpec
    from stages.model.transformer import ModelConfig

log = logging.getLogger("lmpipe")


@register
class TrainStage(DatasetStage):
    name: ClassVar[str] = "train"
    version: ClassVar[str] = "2"  # 2: skipped steps enter the spike window (v1 could stall)
    description: ClassVar[str] = "pretrain a LLaMA-style model with Ray Train + FSDP2; export to Hugging Face"
    Config = TrainStageConfig
    resources: ClassVar[Resources] = Resources(num_cpus=1)
    # writes_through: the DatasetStage default (io and storage write the checkpoint table); the
    # checkpoints are written by the trainer's own code (torch.distributed.checkpoint).
    libraries: ClassVar[tuple[str, ...]] = ("pyarrow", "numpy", "torch", "tokenizers")  # tokenizers: the in-loop evaluation, the export's tokenizer config
    uses_seed: ClassVar[bool] = True
    outputs: ClassVar[tuple[str, ...]] = ("data",)
    measure_column: ClassVar[Optional[str]] = None
    requires: ClassVar[tuple[str, ...]] = ("tokens", "source")
    produces: ClassVar[tuple[str, ...]] = ("step", "tokens_seen", "path", "loss", "val_loss", "final")
    new_rows: ClassVar[bool] = True
    Summary = TrainSummary

    def run(self, ctx) -> None:
        # torch and Ray Train are imported here, not at module level: the registry imports this
        # module whenever lmpipe starts (listing stages, validating a pipeline)
        from stages.train.launch import TrainSpec, launch_ray

        cfg: TrainStageConfig = self.config
        src = ctx.inputs[0]
        info = src.summary(TokenizeSummary)
        model_cfg = cfg.model.build(info.vocab_size, info.seq_len)
        val_files = src.dataset_files("validation") if src.has_dataset("validation") else []
        spec = TrainSpec(
            train=cfg, model=model_cfg, seq_len=info.seq_len, train_files=src.files(), val_files=val_files,
            val_domains=tuple(sorted(info.tokens.get("validation", {}))), seed=ctx.seed,
            storage=ctx.storage, metrics=ctx.run_logger,
            threads_per_worker=cfg.cluster.worker_threads(), in_loop_eval=self._in_loop_eval(ctx, cfg, src, info),
        )
        self._check_cluster(ctx, cfg)
        checkpoint_eval = self._checkpoint_eval(ctx, cfg, src, info)
        resumed_from = self._resumed_from(ctx, cfg, model_cfg)
        run_name = ray_train_run(ctx)
        result = launch_ray(spec, cfg.cluster, storage_path=ctx.stage_dir, name=run_name, storage=ctx.storage,
                            must_stop=ctx.must_stop, checkpoint_eval=checkpoint_eval)
        ctx.fan_out.check()  # a run told to stop (its lease lost) ends here, before it records anything
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        self._record(ctx, cfg, result, model_cfg, info, src, st.join(ctx.stage_dir, run_name), resumed_from)

    def external_inputs(self, ctx) -> list[ExternalInput]:
        """The checkpoint of ``checkpoint.resume_from``: its version enters the fingerprint (a
        checkpoint rewritten in place retrains), and MLflow records it as an input of the run."""
        path = self.config.checkpoint.resume_from
        if path is None:
            return []
        from stages.model.checkpoint import DCP_METADATA, MODEL_CONFIG  # torch: only for a pipeline that resumes

        files = [st.join(path, name) for name in (MODEL_CONFIG, DCP_METADATA)]
        missing = [f for f in files if not ctx.storage.exists(f)]
        if missing:
            raise ValueError(f"stages.{ctx.stage_name}.config.checkpoint.resume_from: {path} is not a complete checkpoint "
                             f"(no {', '.join(os.path.basename(f) for f in missing)})")
        return [ExternalInput("resume_from", path, tuple({"uri": f, **ctx.storage.file_identity(f)} for f in files))]

    @staticmethod
    def _resumed_from(ctx, cfg: TrainStageConfig, model_cfg: ModelConfig) -> Optional[ResumedFrom]:
        """Check ``checkpoint.resume_from`` on the driver, before any worker starts: the same
        model, and a step before ``loop.steps``; its step, tokens and workers for the lineage."""
        path = cfg.checkpoint.resume_from
        if path is None:
            return None
        from stages.model.checkpoint import load_extra, load_model_config, model_mismatch

        key = f"stages.{ctx.stage_name}.config.checkpoint.resume_from"
        mismatch = model_mismatch(path, load_model_config(path, ctx.storage), model_cfg)
        if mismatch:
            raise ValueError(f"{key}: {mismatch}")
        extra = load_extra(path, 0, ctx.storage)
        if int(extra["step"]) >= cfg.loop.steps:
            raise ValueError(f"{key}: {path} is at step {extra['step']}; loop.steps ({cfg.loop.steps}) must be larger to train anything")
        return ResumedFrom(checkpoint=path, step=int(extra["step"]), tokens_seen=int(extra["tokens_seen"]),
                           world_size=int(extra["world_size"]))

    @staticmethod
    def _in_loop_eval(ctx, cfg: TrainStageConfig, src, info: TokenizeSummary) -> Optional[InLoopEvalSpec]:
        """Tokenizer and task requests for the in-loop evaluation, read once on the driver. The
        training code's only run-time import of the evaluation package, and only when configured."""
        ev = cfg.in_loop_eval
        if ev is None:
            return None
        from stages.scoring.hook import InLoopEvalSpec, task_requests

        tokenizer_json = ctx.storage.read_bytes(src.path(info.tokenizer_path)).decode("utf-8")
        prefix = info.prefix_token
        if prefix is None:
            raise ValueError(f"stage {ctx.stage_name!r}: in_loop_eval needs a BOS or EOS token id, and the tokenizer of {src.ref} has neither")
        requests, key = task_requests((ev.task, ev.task_path) if ev.task else None, ev.shots, ev.limit, ev.prompt, ctx.storage)
        return InLoopEvalSpec(every=ev.every, tokenizer_json=tokenizer_json, prefix_token=int(prefix), requests=tuple(requests),
                              task_key=key, validation=ev.validation)

    @staticmethod
    def _checkpoint_eval(ctx, cfg: TrainStageConfig, src, info: TokenizeSummary) -> Optional[CheckpointEvaluator]:
        """The evaluate stage's jobs for each checkpoint, built here once (tasks rendered, the
        validation rows and text sets read): the evaluation tasks get them whole."""
        ev = cfg.checkpoint_eval
        if ev is None:
            return None
        from pipeline.resources import check_resources
        from stages.scoring.checkpoint_eval import build_evaluator

        check_resources(ctx.stage_name, {**({"GPU": 1.0} if ev.use_gpu else {}), "CPU": ev.cpus_per_task}, ctx.fan_out.cluster_resources())
        sample = None
        if ev.validation:
            if not src.has_dataset("validation"):
                raise ValueError(f"stages.{ctx.stage_name}.config.checkpoint_eval.validation: {src.ref.stage} has no validation split"
                                 " (set validation: false)")
            from stages.tokenize.validation import first_per_domain

            sample = first_per_domain(src.dataset_files("validation"), ctx.storage, ev.validation_max_sequences,
                                      info.tokens.get("validation", {}))
        tokenizer_uri = src.path(info.tokenizer_path)
        tokenizer_json = ctx.storage.read_bytes(tokenizer_uri).decode("utf-8")
        return build_evaluator(ev, tokenizer_json, info.bos_id, info.eos_id, tokenizer_uri, sample, ctx.storage, metrics=ctx.run_logger)

    @staticmethod
    def _check_cluster(ctx, cfg: TrainStageConfig) -> None:
        """Fail at once if the cluster cannot hold the training workers, instead of Ray Train
        waiting forever for them (e.g. "train needs 8 GPUs; the cluster has 0")."""
        from pipeline.resources import check_resources

        workers = cfg.cluster
        per_worker = {k: float(v) for k, v in workers.resources_per_worker.items()}
        if workers.use_gpu:  # checked first: the scarce resource is the one worth naming
            per_worker = {"GPU": max(per_worker.pop("GPU", 0.0), 1.0), **per_worker}
        check_resources(ctx.stage_name, per_worker, ctx.fan_out.cluster_resources(), workers=workers.num_workers)

    # -- after training, on the driver ------------------------------------------------------------
    def _record(self, ctx, cfg: TrainStageConfig, result, model_cfg: ModelConfig, info: TokenizeSummary, src, run_uri: str,
                resumed_from: Optional[ResumedFrom]) -> None:
        from stages.model import checkpoint as ckpt
        from stages.model.hf import ExportError
        from stages.train.export import export_task

        final_path = _uri(result.checkpoint.path, ctx.work_dir)
        rows = []
        for checkpoint, metrics in sorted(result.best_checkpoints, key=lambda cm: cm[1].get("step", 0)):
            path = _uri(checkpoint.path, ctx.work_dir)
            rows.append({"step": int(metrics.get("step", 0)), "tokens_seen": int(metrics.get("tokens_seen", 0)), "path": path,
                         "loss": metrics.get("loss"), "val_loss": metrics.get("val_loss"), "final": path == final_path})
        out = ctx.part_outputs("checkpoints", measure_column=None)
        out.write("data", pa.Table.from_pylist(rows, schema=pa.schema([
            ("step", pa.int64()), ("tokens_seen", pa.int64()), ("path", pa.string()), ("loss", pa.float64()),
            ("val_loss", pa.float64()), ("final", pa.bool_())])))
        ctx.add_part_result(out.close(rows_in=src.num_rows))
        evaluations = self._checkpoint_evaluations(ctx, result) if cfg.checkpoint_eval is not None else []

        export_uri = st.join(ctx.attempt_uri, "hf")
        export_error = None
        extra = ckpt.load_extra(final_path, 0, ctx.storage)  # read where it lies: the checkpoint is never downloaded here
        state = json.loads(extra["trainer"])
        special = {"bos_id": info.bos_id, "eos_id": info.eos_id, "pad_id": info.pad_id}
        try:
            # On a worker, streaming tensor by tensor from the checkpoint to the export: the driver
            # (a head node) never holds the weights. Unsupported shapes were refused when the config
            # was validated (ModelSpec); ExportError here means a checkpoint from elsewhere.
            ctx.fan_out.map(export_task, [(final_path, export_uri, src.path(info.tokenizer_path), special, cfg.export_dtype, ctx.storage)],
                            step="export", num_cpus=1)
        except ExportError as e:
            export_error, export_uri = str(e), None
            log.warning("[%s] no Hugging Face export: %s", ctx.stage_name, e)
        png = loss_curve_png(state["history"], ctx.stage_name)
        if png:
            ctx.log_artifact("loss_curve.png", png)
        ctx.log_artifact("train_history.json", json.dumps(state["history"], indent=1))
        model_id = None
        if export_uri:
            with tempfile.TemporaryDirectory() as tmp:
                hf_dir = _export_descriptors(ctx.storage, export_uri, tmp)
                model_id = ctx.log_model(exported_model(ctx, hf_dir, model_cfg, src, extra["step"], rows[-1] if rows else {}, export_uri,
                                                        resumed_from))

        last = rows[-1] if rows else {}
        ctx.set_summary(TrainSummary(
            hf_export=export_uri, hf_export_error=export_error, final_checkpoint=final_path,
            ray_train_run=run_uri, resumed_from=resumed_from,
            steps=int(extra["step"]), tokens_seen=int(extra["tokens_seen"]), world_size=int(extra["world_size"]),
            model=model_cfg.to_dict(), num_params=model_cfg.num_params(), flops_per_token=model_cfg.flops_per_token(model_cfg.max_seq_len),
            final_loss=last.get("loss"), final_val_loss=last.get("val_loss"),
            skipped_steps=state["skipped"], clip_events=state["clip_events"], mlflow_model_id=model_id,
            tokenizer="tokenizer.json" if export_uri else None, checkpoint_evaluations=evaluations,
        ))
        ctx.log_metric("steps", extra["step"])
        ctx.log_metric("tokens_seen", extra["tokens_seen"])
        ctx.log_metric("skipped_steps_total", len(state["skipped"]))
        if last.get("loss") is not None:
            ctx.log_metric("final_loss", last["loss"])
        if last.get("val_loss") is not None:
            ctx.log_metric("final_val_loss", last["val_loss"])

    @staticmethod
    def _checkpoint_evaluations(ctx, result) -> list[CheckpointEvaluation]:
        """Each kept checkpoint's evaluation, as Ray Train merged it into the checkpoint's metrics;
        one warning line for each that did not score."""
        from stages.scoring.checkpoint_eval import ERROR_KEY, RESULTS_KEY

        out = []
        for checkpoint, metrics in sorted(result.best_checkpoints, key=lambda cm: cm[1].get("step", 0)):
            step, path = int(metrics.get("step", 0)), _uri(checkpoint.path, ctx.work_dir)
            if metrics.get(ERROR_KEY):
                record = CheckpointEvaluation(step=step, path=path, status="failed", error=metrics[ERROR_KEY])
            elif RESULTS_KEY in metrics:
                record = CheckpointEvaluation(step=step, path=path, status="scored", results=list(metrics[RESULTS_KEY]))
            else:
                record = CheckpointEvaluation(step=step, path=path, status="timed out or not run")
            if record.status != "scored":
                log.warning("[%s] %s", ctx.stage_name, record.error or f"checkpoint evaluation of step {step} ({path}): {record.status}")
            out.append(record)
        ctx.log_metric("checkpoints_scored", sum(r.status == "scored" for r in out))
        return out

    @classmethod
    def superseded_folders(cls, manifest, folders: list[str]) -> list[str]:
        """Ray Train runs other than the committed one (a replaced output's run, a replacement
        that did not finish): their checkpoints are no output's."""
        keep = manifest.summary.read(TrainSummary).ray_train_run if manifest.summary is not None else None
        return [f for f in folders if f.startswith(RAY_TRAIN_PREFIX) and (keep is None or keep.rstrip("/").rsplit("/", 1)[-1] != f)]


RAY_TRAIN_PREFIX = "ray-train-"
RAY_TRAIN_RUN = "ray_train_run.json"  # in the stage folder: the Ray Train run its computation continues


def ray_train_run(ctx) -> str:
    """The name of the Ray Train run (a folder of the stage folder) that this computation
    continues or starts. Ray Train resumes a run of the same name from its storage, so the name
    decides where training starts:

    * no committed output (a first run, or a rerun after a crash, Ctrl-C or a lost driver): the
      run this fingerprint's last computation started, which continues from its latest checkpoint;
    * a committed output being replaced (``--force``, ``--stage``): a new run, which starts from
      step 0 (or ``checkpoint.resume_from``) -- resuming the committed run would train nothing.
      Runs neither committed nor current (an earlier replacement that did not finish) go."""
    pointer = st.join(ctx.stage_dir, RAY_TRAIN_RUN)
    committed = mf.load_committed(ctx.storage, ctx.stage_dir)
    if committed is None and ctx.storage.exists(pointer):
        name = ctx.storage.read_json(pointer)["name"]
        log.info("[%s] continuing Ray Train run %s", ctx.stage_name, st.join(ctx.stage_dir, name))
        return name
    name = RAY_TRAIN_PREFIX + ctx.attempt.removeprefix("attempt-")
    if committed is not None:
        ctx.fan_out.check()  # deletions only while the stage's lease is ours
        for old in TrainStage.superseded_folders(committed, ctx.storage.ls_dirs(ctx.stage_dir)):
            ctx.storage.rm(st.join(ctx.stage_dir, old))
        log.info("[%s] replacing the committed output: a new Ray Train run %s", ctx.stage_name, st.join(ctx.stage_dir, name))
    ctx.storage.write_json_atomic(pointer, {"name": name, "attempt": ctx.attempt})
    return name


def _uri(path: str, work_dir: str) -> str:
    """Ray gives paths inside its filesystem; put the scheme back for remote work dirs."""
    if st.is_remote(work_dir) and "://" not in path:
        return f"{work_dir.split('://', 1)[0]}://{path}"
    return path


def _export_descriptors(storage: st.Storage, export_uri: str, tmp: str) -> str:
    """The export's files but its weights (config, generation config, tokenizer, shard index) in a
    local folder, for the LoggedModel: copying multi-GB weights through the driver into MLflow
    would undo the worker-side export; the model's ``lmpipe.weights_uri`` tag says where they are."""
    prefix = export_uri.rstrip("/") + "/"
    for uri in storage.find_files(export_uri):
        name = uri[len(prefix):] if uri.startswith(prefix) else os.path.basename(uri)
        if not name.endswith(".safetensors"):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(storage.read_bytes(uri))
    return tmp


def loss_curve_png(history: list[dict[str, float]], title: str) -> Optional[bytes]:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def exported_model(ctx, hf_dir: str, model_cfg: ModelConfig, src, step: int, last: dict[str, Any], weights_uri: str,
                   resumed_from: Optional[ResumedFrom] = None) -> ModelRecord:
    """The export as an MLflow LoggedModel of the stage run, linked to the token shards: the
    model's tags name the dataset, and its final losses are logged against that dataset."""
    from stages.model.hf import hf_architecture

    dataset = DatasetRef(f"{src.ref.stage}.{src.ref.dataset}", src.uri, src.fingerprint)
    lineage = {} if resumed_from is None else {"lmpipe.resumed_from": resumed_from.checkpoint,
                                              "lmpipe.resumed_from_step": str(resumed_from.step)}
    return ModelRecord(
        # named as the evaluate stage names each checkpoint's model: one name per pipeline, model and step
        name=f"{ctx.pipeline_name}-{ctx.stage_name}-step{step}", local_dir=hf_dir, model_type=hf_architecture(model_cfg), step=step,
        params={k: str(v) for k, v in model_cfg.to_dict().items()},
        tags={"lmpipe.fingerprint": ctx.fingerprint, "lmpipe.train_dataset": dataset.name, "lmpipe.train_dataset_uri": src.uri,
              "lmpipe.train_dataset_digest": src.fingerprint, "lmpipe.step": str(step), "lmpipe.format": "huggingface",
              "lmpipe.weights_uri": weights_uri, **lineage},
        metrics={f"final_{key}": last[key] for key in ("loss", "val_loss") if last.get(key) is not None},
        dataset=dataset,
    )
