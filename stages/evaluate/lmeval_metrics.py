"""The metrics, filters and aggregations of lm-eval task files, on plain values (no model here).

Per output type, lm-eval's metrics (``lm_eval.api.metrics``, ``ConfigurableTask.process_results``):

* ``multiple_choice``: ``acc`` (argmax of the summed log-likelihoods), ``acc_norm`` (divided by
  each choice's length in characters), ``acc_bytes`` (in UTF-8 bytes), ``exact_match`` (the gold
  continuation is the greedy one); a list of gold indices counts a prediction in it as right;
* ``loglikelihood``: ``acc`` (the target is the greedy continuation), ``perplexity``
  (exp of minus the mean log-likelihood over documents);
* both, always, whatever ``metric_list`` asks: lmpipe's ``gold_bits_per_byte`` (DataDecide's
  continuous metric): per document, minus the log-likelihood of the gold continuation over ln 2
  times its UTF-8 bytes (the target delimiter included; the first gold of several), averaged;
* ``loglikelihood_rolling``: ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``
  (weighted by each text's words -- ``re.split(r"\\s+")`` -- or UTF-8 bytes);
* ``generate_until``: ``exact_match`` with lm-eval's options (``ignore_case``,
  ``ignore_punctuation``, ``ignore_numbers``, ``regexes_to_ignore``), and ``token_f1``, lmpipe's
  own: SQuAD's token-overlap F1 (lower case, punctuation and articles removed), the best over the
  gold answers (TriviaQA, Jeopardy). lm-eval has no such metric; a task file that uses it runs
  in lmpipe only.

``filter_list`` (generation only) post-processes each answer before scoring, each named
pipeline giving its own scores (``exact_match/strict-match``): ``regex`` (``regex_pattern``,
``group_select``, ``fallback``), ``remove_whitespace``, ``lowercase``, ``uppercase``,
``majority_vote``, ending in ``take_first``. Metrics aggregated by a mean carry lm-eval's
standard error (sample standard deviation / sqrt(n)); the others (perplexities) have none here
(lm-eval bootstraps them with a random generator).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import numpy as np

from stages.scoring.metrics import bits_per_byte, mean_stderr

# metric -> (output types, aggregation)
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "acc": (("multiple_choice", "loglikelihood"), "mean"),
    "acc_norm": (("multiple_choice",), "mean"),
    "acc_bytes": (("multiple_choice",), "mean"),
    "exact_match": (("multiple_choice", "generate_until"), "mean"),
    "perplexity": (("loglikelihood",), "perplexity"),
    "word_perplexity": (("loglikelihood_rolling",), "weighted_perplexity"),
    "byte_perplexity": (("loglikelihood_rolling",), "weighted_perplexity"),
    "bits_per_byte": (("loglikelihood_rolling",), "bits_per_byte"),
    "token_f1": (("generate_until",), "mean"),
    "gold_bits_per_byte": (("multiple_choice", "loglikelihood"), "mean"),
}
# scored for every task of these output types, whether its metric_list names them or not
ALWAYS_SCORED = {"multiple_choice": ("gold_bits_per_byte",), "loglikelihood": ("gold_bits_per_byte",)}
DEFAULT_METRICS = {  # lm-eval's DEFAULT_METRIC_REGISTRY
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
    "generate_until": ("exact_match",),
}
METRIC_OPTIONS = {"exact_match": {"ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"}}
FILTER_STEPS = {
    "take_first": set(),
    "regex": {"regex_pattern", "group_select", "fallback"},
    "remove_whitespace": set(),
    "lowercase": set(),
    "uppercase": set(),
    "majority_vote": set(),
}


def validate_metrics(metric_list: Any, output_type: str, fail: Callable[[str, str], None]):
    from stages.evaluate.lmeval_tasks import MetricSpec

    if metric_list is None:
        return tuple(MetricSpec(m) for m in DEFAULT_METRICS[output_type])
    if not isinstance(metric_list, list) or not metric_list:
        fail("metric_list", "expected a list of {metric: name}")
    out = []
    for i, entry in enumerate(metric_list):
        key = f"metric_list[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("metric"), str):
            fail(key, "expected {metric: name, ...}")
        name = entry["metric"]
        if name not in METRICS:
            fail(key, f"metric {name!r} is not supported (supported: {', '.join(sorted(METRICS))})")
        types, aggregation = METRICS[name]
        if output_type not in types:
            fail(key, f"metric {name!r} is for {' or '.join(types)}, not {output_type}")
        kwargs = {}
        for k, v in entry.items():
            if k in ("metric", "higher_is_better"):
                continue
            if k == "aggregation":
                if v != aggregation:
                    fail(f"{key}.aggregation", f"{v!r}: {name} aggregates by {aggregation} here")
            elif k in METRIC_OPTIONS.get(name, ()):
                kwargs[k] = v
            else:
                fail(f"{key}.{k}", f"not an option of {name}")
        if isinstance(kwargs.get("regexes_to_ignore"), str):
            fail(f"{key}.regexes_to_ignore", "expected a list of patterns")
        out.append(MetricSpec(name, kwargs))
    return tuple(out)


def validate_filters(filter_list: Any, output_type: str, fail: Callable[[str, str], None]):
    from stages.evaluate.lmeval_tasks import FilterSpec

    if filter_list is None:
        return (FilterSpec("none", (("take_first", {}),)),)
    if output_type != "generate_until":
        fail("filter_list", f"filters post-process generated answers; this task is {output_type}")
    if not isinstance(filter_list, list) or not filter_list:
        fail("filter_list", "expected a list of {name, filter: [...]}")
    out = []
    for i, entry in enumerate(filter_list):
        key = f"filter_list[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("filter"), list):
            fail(key, "expected {name: ..., filter: [{function: ...}, ...]}")
        steps = []
        for j, step in enumerate(entry["filter"]):
            fn = step.get("function") if isinstance(step, dict) else None
            if fn not in FILTER_STEPS:
                fail(f"{key}.filter[{j}]", f"filter function {fn!r} is not supported (supported: {', '.join(sorted(FILTER_STEPS))})")
            kwargs = {k: v for k, v in step.items() if k != "function"}
            for k in kwargs:
                if k not in FILTER_STEPS[fn]:
                    fail(f"{key}.filter[{j}].{k}", f"not an option of {fn}")
            if fn == "regex":
                try:
                    re.compile(kwargs.get("regex_pattern", REGEX_DEFAULT))
                except re.error as e:
                    fail(f"{key}.filter[{j}].regex_pattern", f"invalid regular expression: {e}")
            steps.append((fn, kwargs))
        if [s for s, _ in steps].count("take_first") != 1 or steps[-1][0] != "take_first":
            fail(key, "a filter pipeline ends in take_first (one answer per document), and has it once")
        out.append(FilterSpec(entry["name"], tuple(steps)))
    return tuple(out)


# -- filters (lm_eval.filters) ------------------------------------------------------------------------

REGEX_DEFAULT = r"#### (\-?[0-9\.\,]+)"


def _regex(responses: list[str], regex_pattern: str = REGEX_DEFAULT, group_select: int = 0, fallback: str = "[invalid]") -> list[str]:
    pattern = re.compile(regex_pattern)
    out = []
    for resp in responses:
        if not isinstance(resp, str):
            resp = ""
        match = pattern.findall(resp)
        if match:
            match = match[group_select]
            if isinstance(match, tuple):
                match = [m for m in match if m]
                match = match[0] if match else fallback
            match = match.strip()
        else:
            match = fallback
        out.append(match)
    return out


def apply_filter(steps: Sequence[tuple[str, dict]], responses: list[str]) -> str:
    value: Any = list(responses)
    for fn, kwargs in steps:
        if fn == "take_first":
            value = value[0]
        elif fn == "regex":
            value = _regex(value, **kwargs)
        elif fn == "remove_whitespace":
            value = [r.strip() for r in value]
        elif fn == "lowercase":
            value = [r.lower() for r in value]
        elif fn == "uppercase":
            value = [r.upper() for r in value]
        elif fn == "majority_vote":
            value = [Counter(value).most_common(1)[0][0]]
    return value


# -- per-document metrics ---------------------------------------------------------------------------------

def exact_match(prediction: str, reference: str, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False,
                ignore_numbers=False) -> float:
    """lm-eval's ``exact_match_hf_evaluate`` for one pair."""
    if regexes_to_ignore is not None:
        for pattern in regexes_to_ignore:
            prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    if ignore_numbers:
        table = str.maketrans("", "", string.digits)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def _squad_tokens(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1 over normalised tokens (both empty: 1)."""
    pred, gold = _squad_tokens(prediction), _squad_tokens(reference)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def gold_bits_per_byte(ll: float, continuation: str) -> float:
    return bits_per_byte(-ll, len(continuation.encode("utf-8")))


def multiple_choice_metrics(lls: Sequence[float], greedy: Sequence[bool], choices: Sequence[str], gold,
                            continuations: Sequence[str]) -> dict[str, Any]:
    """``continuations``: per choice, what was scored (the target delimiter included)."""
    lls_arr = np.asarray(lls, dtype=np.float64)
    pred = int(np.argmax(lls_arr))
    pred_norm = int(np.argmax(lls_arr / np.array([float(len(c)) for c in choices])))
    pred_bytes = int(np.argmax(lls_arr / np.array([float(len(c.encode("utf-8"))) for c in choices])))
    golds = gold if isinstance(gold, tuple) else (gold,)
    return {
        "acc": 1.0 if pred in golds else 0.0,
        "acc_norm": 1.0 if pred_norm in golds else 0.0,
        "acc_bytes": 1.0 if pred_bytes in golds else 0.0,
        "exact_match": float(int(any(greedy[g] for g in golds))),
        "gold_bits_per_byte": gold_bits_per_byte(lls[golds[0]], continuations[golds[0]]),
        "pred": pred, "pred_norm": pred_norm,
    }


def generation_metrics(answer: str, target, metrics) -> dict[str, float]:
    golds = target if isinstance(target, list) else [target]
    out = {}
    for m in metrics:
        if m.name == "exact_match":
            scores = [exact_match(answer, str(g), **m.kwargs) for g in golds]
            # several gold answers (lm-eval's multiple_target): right if any matches
            out[m.name] = (1.0 if np.mean(scores) > 0.0 else 0.0) if isinstance(target, list) else scores[0]
        elif m.name == "token_f1":
            out[m.name] = max(token_f1(answer, str(g)) for g in golds)
    return out


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


# -- aggregation -----------------------------------------------------------------------------------------

def aggregate(name: str, items: list) -> tuple[float, Optional[float]]:
    """(value, standard error or None) over the documents' items."""
    aggregation = METRICS[name][1]
    if not items:
        return float("nan"), None
    if aggregation == "mean":
        return sum(items) / len(items), mean_stderr(items)
    if aggregation == "perplexity":
        return math.exp(-(sum(items) / len(items))), None
    weighted = sum(a for a, _ in items) / sum(b for _, b in items)
    if aggregation == "weighted_perplexity":
        return math.exp(-weighted), None
    return -weighted / math.log(2), None  # bits_per_byte
