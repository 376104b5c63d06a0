"""One lm-eval task file's requests, scored by one model: the worker's side of
:mod:`stages.evaluate.lmeval_tasks` (prompts are rendered on the driver; this runs them).

Log-likelihoods go through :class:`~stages.scoring.lm.Scorer` (batched by tokens, choices of
a question sharing one forward pass), rolling log-likelihoods through its ``token_nll`` over
lm-eval's rolling windows, generations through :mod:`stages.evaluate.generate`. The result is
plain data: per-document samples and, per metric (and filter), value and standard error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from stages.evaluate import lmeval_metrics as lm_metrics
from stages.evaluate.lmeval_tasks import DocRequest, FilterSpec, MetricSpec


@dataclass(frozen=True)
class LmEvalJob:
    key: str  # "<task>_<k>shot"
    task: str
    output_type: str
    requests: tuple[DocRequest, ...]
    metrics: tuple[MetricSpec, ...]
    filters: tuple[FilterSpec, ...]
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256


def metric_key(metric: str, filter_name: str) -> str:
    """lm-eval's ``metric,filter``, in a form MLflow accepts; the default filter ("none") is left out."""
    return metric if filter_name == "none" else f"{metric}/{filter_name}"


def run_lmeval_job(job: LmEvalJob, scorer, prefix_token: int, generator=None) -> dict[str, Any]:
    t0 = time.perf_counter()
    reqs = job.requests
    samples: list[dict[str, Any]] = []
    items: dict[str, list] = {}
    wanted = [m.name for m in job.metrics]

    def add(metric: str, filter_name: str, value) -> None:
        items.setdefault(metric_key(metric, filter_name), []).append(value)

    scored_metrics = wanted + [m for m in lm_metrics.ALWAYS_SCORED.get(job.output_type, ()) if m not in wanted]

    if job.output_type == "multiple_choice":
        contexts, conts, owner = [], [], []
        for i, r in enumerate(reqs):
            if len({c for c, _ in r.pairs}) == 1:  # one context, a continuation per choice: one shared pass
                contexts.append(r.pairs[0][0])
                conts.append([c for _, c in r.pairs])
                owner.append((i, None))
            else:  # partial evaluation (Winogrande): a context per choice, one continuation each
                for j, (ctx, cont) in enumerate(r.pairs):
                    contexts.append(ctx)
                    conts.append([cont])
                    owner.append((i, j))
        scored = scorer.loglikelihoods(contexts, conts)
        per_doc: list[list] = [[None] * len(r.pairs) for r in reqs]
        for (i, j), sc in zip(owner, scored):
            if j is None:
                per_doc[i] = list(sc)
            else:
                per_doc[i][j] = sc[0]
        for r, sc in zip(reqs, per_doc):
            lls, greedy = [s[0] for s in sc], [s[1] for s in sc]
            m = lm_metrics.multiple_choice_metrics(lls, greedy, r.choices, r.gold, [c for _, c in r.pairs])
            for name in scored_metrics:
                add(name, "none", m[name])
            samples.append({"doc_id": r.doc_id, "where": r.where, "gold": r.gold, "pred": m["pred"], "pred_norm": m["pred_norm"],
                            "lls": lls, "greedy": greedy, **{k: m[k] for k in scored_metrics}})
    elif job.output_type == "loglikelihood":
        scored = scorer.loglikelihoods([r.pairs[0][0] for r in reqs], [[r.pairs[0][1]] for r in reqs])
        for r, sc in zip(reqs, scored):
            ll, greedy = sc[0]
            values = {"acc": float(int(greedy)), "perplexity": ll,
                      "gold_bits_per_byte": lm_metrics.gold_bits_per_byte(ll, r.pairs[0][1])}
            for name in scored_metrics:
                add(name, "none", values[name])
            samples.append({"doc_id": r.doc_id, "where": r.where, "ll": ll, "greedy": bool(greedy), "target": r.target})
    elif job.output_type == "loglikelihood_rolling":
        from stages.scoring.lm import rolling_windows

        encoded = scorer.tokenizer.encode_batch([r.target for r in reqs], add_special_tokens=False)
        windows, owner = [], []
        for d, enc in enumerate(encoded):
            for w in rolling_windows(list(enc.ids), prefix_token, scorer.max_len):
                windows.append(w)
                owner.append(d)
        lls = [0.0] * len(reqs)
        for d, nll in zip(owner, scorer.token_nll(windows)):
            lls[d] -= float(nll.sum())
        for r, ll in zip(reqs, lls):
            n_bytes, n_words = len(r.target.encode("utf-8")), lm_metrics.count_words(r.target)
            values = {"word_perplexity": (ll, n_words), "byte_perplexity": (ll, n_bytes), "bits_per_byte": (ll, n_bytes)}
            for name in wanted:
                add(name, "none", values[name])
            samples.append({"doc_id": r.doc_id, "where": r.where, "ll": ll, "words": n_words, "bytes": n_bytes})
    elif job.output_type == "generate_until":
        if generator is None:
            raise ValueError(f"task {job.task}: generation needs a generator")
        answers = generator.generate([r.pairs[0][0] for r in reqs], list(job.until), job.max_gen_toks)
        for r, answer in zip(reqs, answers):
            sample = {"doc_id": r.doc_id, "where": r.where, "generation": answer, "target": r.target}
            for f in job.filters:
                filtered = lm_metrics.apply_filter(f.steps, [answer])
                sample[f"filtered/{f.name}"] = filtered
                for name, value in lm_metrics.generation_metrics(filtered, r.target, job.metrics).items():
                    add(name, f.name, value)
                    sample[metric_key(name, f.name)] = value
            samples.append(sample)
    else:  # validated when the task file was read
        raise ValueError(f"task {job.task}: unknown output_type {job.output_type!r}")

    metrics: dict[str, dict[str, Optional[float]]] = {}
    for key, values in items.items():
        value, stderr = lm_metrics.aggregate(key.split("/")[0], values)
        metrics[key] = {"value": float(value), "stderr": stderr, "n": len(values)}
    seconds = time.perf_counter() - t0
    return {"metrics": metrics, "samples": samples, "seconds": seconds, "examples_per_second": len(reqs) / max(seconds, 1e-9)}
