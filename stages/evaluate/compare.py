"""An ablation's comparison: every variant's evaluation at its last checkpoint against the base,
and against the seed noise -- the spread of the base's own results over its seeds (DataDecide:
a difference smaller than that means nothing). Input: each variant's rows of the evaluate
stage's ``data`` output (:data:`stages.evaluate.report.ROW_FIELDS`); output: Markdown, CSV and a
plot of validation bits per byte against tokens seen."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from typing import Any, Optional

from stages.evaluate.report import TABLE_METRICS, _is_percent, human_tokens

# The validation set pooled over its domains (stages.scoring.metrics.domain_metrics: ``_all``).
VALIDATION_OVERALL = "validation/_all"
DEFAULT_SIGMAS = 2.0
COLUMNS = ("variant", "task", "metric", "value", "stderr", "diff_to_base", "seed_std", "seeds", "beyond_noise", "tokens_seen")


@dataclass(frozen=True)
class ComparisonRow:
    variant: str
    task: str
    metric: str
    value: Optional[float]
    stderr: Optional[float]  # of the value (the task's examples); None where the metric has none
    diff_to_base: Optional[float]  # value - the base's (mean over its seeds)
    seed_std: Optional[float]  # standard deviation of the base over its seeds (None: fewer than two seeds)
    seeds: int  # how many base runs the noise is measured over
    beyond_noise: Optional[bool]  # |diff| > sigmas x seed_std; None: no noise measured, or a run of the base itself
    tokens_seen: Optional[int]


def _number(x: Any) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def last_checkpoint(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the checkpoint that saw the most tokens (the variant's proxy model at its budget)."""
    if not rows:
        return []
    key = max(((r.get("tokens_seen") or 0, r.get("step") or 0, r["checkpoint"]) for r in rows))
    return [r for r in rows if (r.get("tokens_seen") or 0, r.get("step") or 0, r["checkpoint"]) == key]


def compare(results: dict[str, list[dict[str, Any]]], base_runs: list[str], sigmas: float = DEFAULT_SIGMAS,
            metrics: tuple[str, ...] = TABLE_METRICS) -> list[ComparisonRow]:
    """``results``: variant name -> its evaluation rows (every checkpoint), in display order;
    ``base_runs``: the names of the base's runs (the base and its seed repeats)."""
    final = {name: {(r["task"], r["metric"]): r for r in last_checkpoint(rows) if r["metric"].split("/")[0] in metrics}
             for name, rows in results.items()}
    keys = sorted({k for cells in final.values() for k in cells}, key=lambda k: (k[1].split("/")[0] == "bits_per_byte", k))
    out = []
    for task, metric in keys:
        base_values = [v for v in (_number(final[b].get((task, metric), {}).get("value")) for b in base_runs if b in final) if v is not None]
        base_mean = statistics.fmean(base_values) if base_values else None
        noise = statistics.stdev(base_values) if len(base_values) >= 2 else None
        for name, cells in final.items():
            r = cells.get((task, metric))
            if r is None:
                continue
            value = _number(r.get("value"))
            diff = value - base_mean if value is not None and base_mean is not None else None
            beyond = None
            if name not in base_runs and diff is not None and noise is not None:
                beyond = abs(diff) > sigmas * noise
            out.append(ComparisonRow(name, task, metric, value, _number(r.get("stderr")), diff, noise, len(base_values), beyond,
                                     r.get("tokens_seen")))
    return out


def _fmt(x: Optional[float], metric: str, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    if _is_percent(metric):
        return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def markdown(rows: list[ComparisonRow], sigmas: float = DEFAULT_SIGMAS) -> str:
    header = ["task", "metric", "variant", "value ± se", "Δ base", "seed σ", f"beyond {sigmas:g}σ", "tokens"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|---:|:---:|---:|"]
    for r in rows:
        unit = " (%)" if _is_percent(r.metric) else ""
        value = _fmt(r.value, r.metric) + (f" ± {_fmt(r.stderr, r.metric)}" if r.stderr is not None else "")
        beyond = {True: "yes", False: "no", None: "—"}[r.beyond_noise]
        sigma = _fmt(r.seed_std, r.metric) + f" (n={r.seeds})" if r.seed_std is not None else f"n/a (n={r.seeds})"
        lines.append(f"| {r.task} | {r.metric}{unit} | {r.variant} | {value} | {_fmt(r.diff_to_base, r.metric, signed=True)} | {sigma}"
                     f" | {beyond} | {human_tokens(r.tokens_seen)} |")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[ComparisonRow]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(["" if getattr(r, c) is None else getattr(r, c) for c in COLUMNS])
    return buf.getvalue()


def bpb_curves(results: dict[str, list[dict[str, Any]]], task: str = VALIDATION_OVERALL) -> dict[str, list[tuple[int, float]]]:
    """Per variant: (tokens seen, validation bits per byte) at each evaluated checkpoint."""
    curves = {}
    for name, rows in results.items():
        points = sorted((r.get("tokens_seen") or 0, float(r["value"])) for r in rows
                        if r["task"] == task and r["metric"] == "bits_per_byte" and _number(r["value"]) is not None)
        if points:
            curves[name] = points
    return curves


def bpb_png(results: dict[str, list[dict[str, Any]]], title: str) -> Optional[bytes]:
    """Validation bits per byte (all domains pooled) against tokens seen, one line per variant."""
    curves = bpb_curves(results)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=name, linestyle="--" if name.startswith("base.") else "-")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: validation bits per byte by variant")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: the same results, the same bytes
    plt.close(fig)
    return buf.getvalue()
