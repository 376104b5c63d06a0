"""The evaluate stage's side of lm-eval task files: its config entry, what the fingerprint reads,
the jobs it fans out (prompts rendered once on the driver) and the rows its results become.

Kept apart from :mod:`stages.evaluate.stage` so that the stage only wires it in."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import Field, field_validator, model_validator

from pipeline import storage as st
from pipeline.config import PathStr, StrictModel
from stages.evaluate.lmeval_run import LmEvalJob
from stages.evaluate.lmeval_tasks import (
    DEFAULT_FEWSHOT_SEED, BadDoc, TaskDocs, TaskFile, TaskFileError, build_doc_requests, bundled_task_file, load_docs, load_task_file,
    task_files_in,
)

log = logging.getLogger("lmpipe")


class LmEvalTaskEntry(StrictModel):
    path: Optional[PathStr] = Field(default=None, description="an lm-eval task YAML, or a folder of them; data in local or s3:// JSON/JSONL/Parquet files")
    task: Optional[str] = Field(default=None, description="one of lm-eval's bundled tasks by name (arc_easy), its data given by data_files")
    data_files: Optional[dict[str, PathStr]] = Field(default=None, description="{split: file}: the task's data (replaces its dataset)")
    shots: Optional[list[int]] = Field(default=None, description="few-shot counts (default: the task's num_fewshot, else 0)")
    limit: Optional[int] = Field(default=None, ge=1, description="the first N documents, as lm-eval's --limit")
    fewshot_seed: int = Field(default=DEFAULT_FEWSHOT_SEED, description="lm-eval's fewshot_random_seed")

    @field_validator("shots")
    @classmethod
    def _shots(cls, v):
        if v is not None and (not v or any(s < 0 for s in v) or len(set(v)) != len(v)):
            raise ValueError("shots must be distinct non-negative integers")
        return v

    @model_validator(mode="after")
    def _task_files_are_valid(self):
        """A local task file is read and validated with the pipeline's config, before any work."""
        if (self.path is None) == (self.task is None):
            raise ValueError("give either path (task files) or task (one of lm-eval's bundled tasks)")
        if self.task is not None and not self.data_files:
            raise ValueError(f"task {self.task!r}: a bundled task's data is on a hub; give data_files ({{split: file}})")
        if self.task is not None or not st.is_remote(self.path):
            try:
                for f in self.files(st.Storage()):
                    load_task_file(f, data_files=self.data_files)
            except TaskFileError as e:
                raise ValueError(str(e)) from None
        return self

    def files(self, storage) -> list[str]:
        return [bundled_task_file(self.task)] if self.task is not None else task_files_in(self.path, storage)


@dataclass
class LoadedLmEvalTask:
    entry: LmEvalTaskEntry
    task: TaskFile
    docs: TaskDocs
    jobs: tuple[LmEvalJob, ...]
    bad: list[BadDoc]

    @property
    def shots(self) -> list[int]:
        return [int(j.key.rsplit("_", 1)[1].removesuffix("shot")) for j in self.jobs]


def task_files(entries: list[LmEvalTaskEntry], storage) -> list[tuple[LmEvalTaskEntry, str]]:
    return [(e, f) for e in entries for f in e.files(storage)]


def external_inputs(entries: list[LmEvalTaskEntry], storage) -> list:
    """Each task file, the files it includes and its data files: their identities enter the fingerprint."""
    from pipeline.context import ExternalInput

    out = []
    for entry, path in task_files(entries, storage):
        task = load_task_file(path, storage, entry.data_files)
        files = list(task.files) + [f for fs in task.data_files.values() for f in fs]
        out.append(ExternalInput(f"lmeval:{task.name}", path, tuple({"uri": f, **storage.file_identity(f)} for f in files)))
    return out


def load_tasks(entries: list[LmEvalTaskEntry], storage) -> list[LoadedLmEvalTask]:
    out, names = [], set()
    for entry, path in task_files(entries, storage):
        task = load_task_file(path, storage, entry.data_files)
        if task.name in names:
            raise TaskFileError(f"{path}: task {task.name!r} is named twice")
        names.add(task.name)
        docs = load_docs(task, storage)
        jobs, bad = [], list(docs.bad)
        seen = {b.where for b in bad}
        for k in entry.shots if entry.shots is not None else [task.num_fewshot or 0]:
            requests, bad_k = build_doc_requests(task, docs, k, entry.limit, entry.fewshot_seed)
            bad += [b for b in bad_k if b.where not in seen]  # a document is quarantined once, whatever the shots
            seen |= {b.where for b in bad_k}
            jobs.append(LmEvalJob(f"{task.name}_{k}shot", task.name, task.output_type, tuple(requests), task.metrics, task.filters,
                                  task.until, task.max_gen_toks))
        out.append(LoadedLmEvalTask(entry, task, docs, tuple(jobs), bad))
    return out


def summary_entries(loaded: list[LoadedLmEvalTask]) -> dict[str, dict[str, Any]]:
    return {t.task.name: {"source": t.task.path, "digest": t.task.digest, "data": t.docs.data_digests, "output_type": t.task.output_type,
                          "examples": len(t.docs.splits[t.task.eval_split]), "shots": t.shots, "prompt": "lm-eval task file",
                          "limit": t.entry.limit, "fewshot_seed": t.entry.fewshot_seed,
                          "skipped_lines": _counts(t.bad)} for t in loaded}


def _counts(bad: list[BadDoc]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in bad:
        out[b.reason] = out.get(b.reason, 0) + 1
    return out


def bad_lines(loaded: list[LoadedLmEvalTask]) -> list[dict[str, str]]:
    out = []
    for t in loaded:
        if t.bad:
            log.warning("task %s: quarantined %d document(s) (%s)", t.task.name, len(t.bad),
                        ", ".join(f"{k}: {v}" for k, v in sorted(_counts(t.bad).items())))
            for b in t.bad[:20]:
                log.warning("  %s", b.message)
        out += [{"task": t.task.name, "where": b.where, "reason": b.reason, "message": b.message} for b in t.bad]
    return out


def result_rows(base: dict[str, Any], results: dict[str, Any]) -> tuple[list[dict], list[dict], list[dict]]:
    """(data rows, examples rows for multiple choice, timings) of one checkpoint's lm-eval results."""
    rows, examples, timings = [], [], []
    for key, res in results.items():
        for metric, m in sorted(res["metrics"].items()):
            rows.append({**base, "task": key, "metric": metric, "value": m["value"], "stderr": m["stderr"], "n": m["n"]})
        for s in res["samples"]:
            if "lls" in s:
                gold = s["gold"][0] if isinstance(s["gold"], (tuple, list)) else s["gold"]
                examples.append({**base, "task": key, "id": s["where"], "gold": gold, "pred": s["pred"], "pred_norm": s["pred_norm"],
                                 "lls": list(s["lls"]), "greedy": list(s["greedy"])})
        timings.append({"checkpoint": base["checkpoint"], "task": key, "examples": len(res["samples"]), "seconds": round(res["seconds"], 3),
                        "examples_per_second": round(res["examples_per_second"], 2)})
    return rows, examples, timings


LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "gold_bits_per_byte"}


def lmpipe_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmpipe")
    except PackageNotFoundError:
        return "unknown"


def results_json(loaded: list[LoadedLmEvalTask], rows: list[dict[str, Any]], checkpoint: str) -> dict[str, Any]:
    """One checkpoint's scores in lm-eval's results layout (``simple_evaluate``'s return value, as
    ``--output_path`` writes it), so tools that read lm-eval results read these: ``results`` keyed
    by ``<task>_<k>shot`` with ``metric,filter`` keys, ``n-shot``, ``versions``, ``higher_is_better``,
    ``n-samples``, and per task the stamp of what was scored (task file and data digests, shots,
    few-shot seed, lmpipe's version)."""
    by_key = {j.key: (t, j) for t in loaded for j in t.jobs}
    out: dict[str, Any] = {"results": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {}, "higher_is_better": {},
                           "n-samples": {}, "config": {"model": "lmpipe", "model_args": checkpoint}, "lmpipe_version": lmpipe_version()}
    for r in rows:
        if r["checkpoint"] != checkpoint or r["task"] not in by_key:
            continue
        task, job = by_key[r["task"]]
        key = r["task"]
        metric, _, filter_name = r["metric"].partition("/")
        filter_name = filter_name or "none"
        res = out["results"].setdefault(key, {"alias": key})
        res[f"{metric},{filter_name}"] = r["value"]
        res[f"{metric}_stderr,{filter_name}"] = r["stderr"] if r["stderr"] is not None else "N/A"
        out["higher_is_better"].setdefault(key, {})[metric] = metric not in LOWER_IS_BETTER
        shots = int(key.rsplit("_", 1)[1].removesuffix("shot"))
        out["n-shot"][key] = shots
        out["versions"][key] = "Yaml"  # lm-eval's version of a task file without metadata.version
        out["group_subtasks"][key] = []
        out["n-samples"][key] = {"original": len(task.docs.splits[task.task.eval_split]), "effective": int(r["n"])}
        out["configs"][key] = {
            "task": task.task.name, "output_type": task.task.output_type, "num_fewshot": shots,
            "fewshot_config": {"sampler": task.task.fewshot["sampler"]},
            "metadata": {"task_file": task.task.path, "task_file_digest": task.task.digest, "data_files": task.docs.data_digests,
                         "fewshot_seed": task.entry.fewshot_seed, "lmpipe_version": out["lmpipe_version"]},
        }
    return out


def sample_schema():
    import pyarrow as pa

    return pa.schema([
        ("checkpoint", pa.string()), ("step", pa.int64()), ("tokens_seen", pa.int64()), ("task", pa.string()), ("id", pa.string()),
        ("doc_id", pa.int64()), ("prompt", pa.string()), ("continuations", pa.list_(pa.string())), ("lls", pa.list_(pa.float64())),
        ("greedy", pa.list_(pa.bool_())), ("generation", pa.string()), ("filtered", pa.string()), ("target", pa.string()),
        ("pred", pa.int64()), ("metrics", pa.string()),
    ])


def sample_rows(results: list[dict[str, Any]], loaded: list[LoadedLmEvalTask]) -> list[dict[str, Any]]:
    """Every scored document of every lm-eval task, per checkpoint, as lm-eval's ``--log_samples``
    keeps them: the prompt and continuations sent, per-continuation log-likelihoods (or the
    generation and its filtered answers), the gold, the prediction and the document's metrics."""
    import json

    requests = {j.key: {r.doc_id: r for r in j.requests} for t in loaded for j in t.jobs}
    out = []
    for res in results:
        base = {"checkpoint": res["checkpoint"], "step": res.get("step"), "tokens_seen": res.get("tokens_seen")}
        for key, task_res in res.get("lmeval", {}).items():
            for s in task_res["samples"]:
                req = requests[key][s["doc_id"]]
                lls = s.get("lls", [s["ll"]] if "ll" in s else None)
                greedy = s.get("greedy")
                out.append({
                    **base, "task": key, "id": s["where"], "doc_id": s["doc_id"],
                    "prompt": req.pairs[0][0] if req.pairs else "", "continuations": [c for _, c in req.pairs] if req.pairs else None,
                    "lls": lls, "greedy": greedy if isinstance(greedy, list) else ([greedy] if greedy is not None else None),
                    "generation": s.get("generation"),
                    "filtered": json.dumps({k.split("/", 1)[1]: v for k, v in s.items() if k.startswith("filtered/")}) if "generation" in s else None,
                    "target": json.dumps(req.gold if req.gold is not None else req.target), "pred": s.get("pred"),
                    "metrics": json.dumps({k: v for k, v in s.items() if k in _METRIC_NAMES or "/" in k and not k.startswith("filtered/")}),
                })
    return out


_METRIC_NAMES = {"acc", "acc_norm", "acc_bytes", "exact_match", "token_f1", "gold_bits_per_byte"}
