"""Evaluation jobs -- one checkpoint x one task group -- shared by the ``evaluate`` stage and the
train stage's checkpoint evaluation (``checkpoint_eval``: the same jobs, run by Ray as training
commits each checkpoint):

* :class:`EvalJob` (and its :class:`TaskJob` / :class:`TextJob` parts): everything a job needs,
  built on a driver, run on a worker; :func:`checkpoint_jobs` lays out one checkpoint's jobs the
  same way for both callers;
* :func:`open_job`, :func:`score_tasks`, :func:`score_texts`, :func:`run_job`: the scoring;
* :func:`job_fingerprint` and :func:`store_result` / :func:`stored_result`: a job's result kept
  beside its checkpoint, under a fingerprint of what decides it (the checkpoint's files, the
  tokenizer, every rendered request and text, device, dtype, threads, batching, this package's
  code and the libraries' versions), so the evaluate stage reuses what training already scored and
  recomputes anything else.

lm-eval task files (``EvalJob.lmeval``) are the evaluate stage's own (their code lives there):
those jobs have no fingerprint and are always computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any, Optional, Sequence

import numpy as np

from stages.scoring.batching import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_SIZE

RESULTS_FOLDER = "evaluations"  # <checkpoint's folder>/evaluations/<checkpoint's name>/<fingerprint>.json
RESULT_FORMAT = 1  # the stored JSON's layout; part of the fingerprint
LIBRARIES = ("numpy", "tokenizers", "torch")


@dataclass(frozen=True)
class TaskJob:
    """A multiple-choice task, its requests already rendered (prompts are decided on the driver)."""

    key: str  # e.g. "mmlu_0shot"
    requests: tuple  # tuple[MCRequest, ...]


@dataclass(frozen=True)
class TextJob:
    key: str  # "validation" or a text set's name
    kind: str  # "validation" | "text"
    tokens: Optional[np.ndarray] = None  # validation: [rows, seq_len + 1]
    sources: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    max_rows_per_domain: Optional[int] = None


@dataclass(frozen=True)
class EvalJob:
    checkpoint: str
    tokenizer_json: str
    prefix_token: int
    eos_token: Optional[int] = None  # ends a generation (lm-eval's generate_until)
    tasks: tuple[TaskJob, ...] = ()
    texts: tuple[TextJob, ...] = ()
    lmeval: tuple = ()  # the evaluate stage's lm-eval task files (stages.evaluate.lmeval_run)
    storage: Any = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    share_context: bool = True
    hf_runtime: str = "lmpipe"  # or "transformers": what runs a Hugging Face export (stages.scoring.lm.load_checkpoint)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobSettings:
    """How every job of a run scores (the evaluate stage's config, or the train stage's ``checkpoint_eval``)."""

    storage: Any = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    share_context: bool = True
    hf_runtime: str = "lmpipe"


def task_jobs(task: Any, prompt: str, shots: Sequence[int], limit: Optional[int], name: str) -> tuple[TaskJob, ...]:
    """One task entry's group: a :class:`TaskJob` per few-shot count (``<name>_<k>shot``)."""
    from stages.scoring.tasks import build_requests

    return tuple(TaskJob(f"{name}_{k}shot", tuple(build_requests(task, prompt, k, limit))) for k in shots)


def validation_job(sample: Any) -> TextJob:
    """Bits per byte on the validation split's rows (a ``stages.tokenize.validation.ValidationSample``)."""
    return TextJob("validation", "validation", tokens=sample.tokens.astype(np.int32), sources=tuple(sample.sources))


def text_set_jobs(entries: Sequence[Any], storage: Any) -> tuple[list[TextJob], dict[str, str]]:
    """Bits per byte on each text set (``stages.scoring.entries.TextSetEntry``), and its digest."""
    from stages.scoring.perplexity import read_text_set

    jobs, digests = [], {}
    for s in entries:
        texts, domains, digest = read_text_set(s.path, storage, s.text_field, s.domain_field, s.name, s.max_docs)
        jobs.append(TextJob(s.name, "text", sources=tuple(domains), texts=tuple(texts)))
        digests[s.name] = f"sha256:{digest}"
    return jobs, digests


def special_tokens(tokenizer_json: str, bos: Optional[int], eos: Optional[int], source: str) -> tuple[int, Optional[int]]:
    """(the token that conditions an empty context: BOS, else EOS; the EOS that ends a generation),
    from the ids given, else the tokenizer's ``<|bos|>`` / ``<|eos|>``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    if bos is None:
        bos = tok.token_to_id("<|bos|>")
    if eos is None:
        eos = tok.token_to_id("<|eos|>")
    prefix = bos if bos is not None else eos
    if prefix is None:
        raise ValueError(f"tokenizer {source}: has neither a BOS nor an EOS token to condition empty contexts and documents on")
    return int(prefix), eos


def checkpoint_jobs(checkpoint: str, tokenizer_json: str, prefix_token: int, eos_token: Optional[int],
                    task_groups: Sequence[tuple[TaskJob, ...]], texts: Sequence[TextJob], settings: JobSettings,
                    lmeval_groups: Sequence[tuple] = (), meta: Optional[dict[str, Any]] = None) -> list[EvalJob]:
    """One checkpoint's jobs, in one order for every caller: a job per task group, one per lm-eval
    task file, and one for all text (validation and text sets) together."""
    own = dict(checkpoint=checkpoint, tokenizer_json=tokenizer_json, prefix_token=prefix_token, eos_token=eos_token,
               meta=dict(meta or {}), **{f.name: getattr(settings, f.name) for f in fields(settings)})  # not asdict: Storage stays itself
    jobs = [EvalJob(tasks=tuple(group), **own) for group in task_groups]
    jobs += [EvalJob(lmeval=tuple(group), **own) for group in lmeval_groups]
    if texts:
        jobs.append(EvalJob(texts=tuple(texts), **own))
    return jobs


# -- running ---------------------------------------------------------------------------------------

@dataclass
class OpenedJob:
    """A job's checkpoint loaded and ready to score, and the result being filled in."""

    tokenizer: Any
    model: Any
    scorer: Any
    out: dict[str, Any]
    started: float


def open_job(job: EvalJob) -> OpenedJob:
    import torch
    from tokenizers import Tokenizer

    from stages.model.transformer import Transformer
    from stages.scoring.lm import Scorer, load_checkpoint

    if job.device == "cpu":
        torch.set_num_threads(job.threads)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_str(job.tokenizer_json)
    loaded = load_checkpoint(job.checkpoint, job.storage, getattr(torch, job.dtype), job.device,
                             vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), hf_runtime=job.hf_runtime)
    fast = isinstance(loaded.model, Transformer)  # a foreign architecture is called as a whole
    scorer = Scorer(loaded.model, tokenizer, job.device, job.batch_tokens, job.max_batch_size, job.prefix_token,
                    job.share_context and fast, fast=fast)
    out: dict[str, Any] = {"checkpoint": job.checkpoint, "kind": loaded.kind, "runtime": "lmpipe" if fast else "transformers",
                           "step": loaded.step, "tokens_seen": loaded.tokens_seen,
                           "load_seconds": time.perf_counter() - t0, "tasks": {}, "texts": {}, "node": os.uname().nodename,
                           "device": job.device, **job.meta}
    return OpenedJob(tokenizer, loaded.model, scorer, out, t0)


def score_tasks(job: EvalJob, opened: OpenedJob) -> None:
    from stages.scoring.metrics import score_example

    for task in job.tasks:
        t = time.perf_counter()
        reqs = task.requests
        scores = opened.scorer.loglikelihoods([r.context for r in reqs], [r.continuations for r in reqs])
        results = [score_example(r.id, r.gold, r.choices, [s[0] for s in sc], [s[1] for s in sc], r.continuations[r.gold])
                   for r, sc in zip(reqs, scores)]
        seconds = time.perf_counter() - t
        opened.out["tasks"][task.key] = {"results": results, "seconds": seconds, "examples_per_second": len(reqs) / max(seconds, 1e-9)}


def score_texts(job: EvalJob, opened: OpenedJob) -> None:
    from stages.scoring.metrics import domain_metrics
    from stages.scoring.perplexity import text_bpb, token_byte_lengths, validation_bpb

    byte_lengths = None
    for text in job.texts:
        t = time.perf_counter()
        if text.kind == "validation":
            if byte_lengths is None:
                byte_lengths = token_byte_lengths(opened.tokenizer)
            totals = validation_bpb(opened.scorer, text.tokens, list(text.sources), byte_lengths, text.max_rows_per_domain)
        else:
            totals = text_bpb(opened.scorer, list(text.texts), list(text.sources), job.prefix_token)
        opened.out["texts"][text.key] = {"domains": domain_metrics(totals), "seconds": time.perf_counter() - t}


def run_job(job: EvalJob) -> dict[str, Any]:
    """A job without lm-eval task files (those are the evaluate stage's: ``stages.evaluate.worker``)."""
    if job.lmeval:
        raise ValueError("stages.scoring.jobs.run_job scores tasks and text; lm-eval task files run through stages.evaluate.worker")
    opened = open_job(job)
    score_tasks(job, opened)
    score_texts(job, opened)
    opened.out["seconds"] = time.perf_counter() - opened.started
    return opened.out


def result_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """(task, metric, value, stderr, n) of a job's multiple-choice tasks and text, as the
    evaluate stage's ``data`` rows have them."""
    from stages.scoring.metrics import aggregate

    rows = []
    for key, t in res["tasks"].items():
        agg = aggregate(t["results"])
        for metric in ("acc", "acc_norm", "gold_bits_per_byte"):
            rows.append({"task": key, "metric": metric, "value": agg[metric], "stderr": agg[f"{metric}_stderr"], "n": int(agg["n"])})
    for key, t in res["texts"].items():
        for domain, metrics in t["domains"].items():
            n = int(metrics.get("tokens", 0))
            for metric, value in metrics.items():
                if metric in ("tokens", "bytes"):
                    continue
                rows.append({"task": f"{key}/{domain}", "metric": metric, "value": float(value), "stderr": None, "n": n})
    return rows


# -- fingerprints and stored results ---------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_identity(uri: str, storage: Any) -> list[list[Any]]:
    """Every file of the checkpoint with its size and mtime or ETag: a checkpoint rewritten in
    place is another checkpoint."""
    from pipeline import storage as st

    storage = storage or st.Storage()
    prefix = uri.rstrip("/") + "/"
    files = storage.find_files(uri) if storage.exists(uri) else []
    return [[f[len(prefix):] if f.startswith(prefix) else os.path.basename(f), storage.file_identity(f)] for f in sorted(files)]


@lru_cache(maxsize=1)  # once per process: the code it hashes does not change under a running job
def _code() -> dict[str, Any]:
    from pipeline.code_digest import code_digests, combined, library_versions

    return {"code": combined(code_digests(__name__)), "libraries": library_versions(LIBRARIES)}


def job_fingerprint(job: EvalJob) -> Optional[str]:
    """What decides a job's result, hashed; None for a job with lm-eval task files (never stored)."""
    if job.lmeval:
        return None
    tasks = [[t.key, [[r.id, r.context, list(r.continuations), list(r.choices), int(r.gold)] for r in t.requests]] for t in job.tasks]
    texts = []
    for x in job.texts:
        tokens = None if x.tokens is None else [str(x.tokens.dtype), list(x.tokens.shape), _sha(np.ascontiguousarray(x.tokens).tobytes())]
        texts.append([x.key, x.kind, tokens, list(x.sources), _sha(json.dumps(list(x.texts)).encode()), x.max_rows_per_domain])
    what = {"format": RESULT_FORMAT, **_code(), "checkpoint": checkpoint_identity(job.checkpoint, job.storage),
            "tokenizer": _sha(job.tokenizer_json.encode()), "prefix_token": job.prefix_token, "eos_token": job.eos_token,
            "device": job.device, "dtype": job.dtype, "threads": job.threads, "batch_tokens": job.batch_tokens,
            "max_batch_size": job.max_batch_size, "share_context": job.share_context, "hf_runtime": job.hf_runtime,
            "tasks": tasks, "texts": texts}
    return _sha(json.dumps(what, sort_keys=True).encode())[:32]


def result_uri(checkpoint: str, fingerprint: str) -> str:
    """Beside the checkpoint (not in it: its files are its identity)."""
    from pipeline import storage as st

    base = checkpoint.rstrip("/")
    parent, name = (base.rsplit("/", 1) if "/" in base else ("", base))
    return st.join(parent, RESULTS_FOLDER, name, f"{fingerprint}.json")


def _to_json(res: dict[str, Any]) -> dict[str, Any]:
    out = dict(res)
    out["tasks"] = {k: {**t, "results": [asdict(r) for r in t["results"]]} for k, t in res["tasks"].items()}
    return out


def _from_json(data: dict[str, Any]) -> dict[str, Any]:
    from stages.scoring.metrics import ChoiceResult

    out = dict(data)
    out["tasks"] = {k: {**t, "results": [ChoiceResult(**{**r, "lls": tuple(float(x) for x in r["lls"]),
                                                        "greedy": tuple(bool(g) for g in r["greedy"])}) for r in t["results"]]}
                    for k, t in data["tasks"].items()}
    return out


def store_result(job: EvalJob, fingerprint: str, res: dict[str, Any]) -> str:
    """Written atomically (a reader sees the whole result or none); floats as Python writes them
    (shortest round trip), so a stored result reads back bit for bit; keys in the result's own
    order (not sorted), which is the order of the rows made from it."""
    from pipeline import storage as st

    uri = result_uri(job.checkpoint, fingerprint)
    data = json.dumps({"fingerprint": fingerprint, "result": _to_json(res)}, indent=1).encode()
    (job.storage or st.Storage()).write_bytes_atomic(uri, data)
    return uri


def stored_result(job: EvalJob, fingerprint: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The job's result scored earlier (by the train stage's checkpoint evaluation) under the same
    fingerprint (``job_fingerprint(job)`` unless given), with this job's checkpoint name and
    metadata; None when there is none."""
    from pipeline import storage as st

    fingerprint = fingerprint or job_fingerprint(job)
    if fingerprint is None:
        return None
    storage = job.storage or st.Storage()
    uri = result_uri(job.checkpoint, fingerprint)
    if not storage.exists(uri):
        return None
    data = json.loads(storage.read_bytes(uri))
    if data.get("fingerprint") != fingerprint:
        return None
    res = _from_json(data["result"])
    return {**res, "checkpoint": job.checkpoint, **job.meta, "reused_from": uri}
