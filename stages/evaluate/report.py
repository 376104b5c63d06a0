"""Results as the seeds publish them: one table of task x metric by checkpoint (tokens seen),
as Markdown and CSV, and a PNG of each metric over training. ``lmpipe eval-table`` reads them
back from a stage folder or an MLflow run."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Optional

# The long-format rows of the evaluate stage's ``data`` output.
ROW_FIELDS = ("checkpoint", "step", "tokens_seen", "task", "metric", "value", "stderr", "n")
# Which metrics make the table (others stay in the data output and MLflow).
TABLE_METRICS = ("acc", "acc_norm", "exact_match", "token_f1", "gold_bits_per_byte", "bits_per_byte")
# Fractions of examples, shown as percentages (a filtered score is "<metric>/<filter>").
PERCENT_METRICS = ("acc", "acc_norm", "acc_bytes", "exact_match", "token_f1")


def _is_percent(metric: str) -> bool:
    return metric.split("/")[0] in PERCENT_METRICS


def human_tokens(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def column_label(row: dict[str, Any]) -> str:
    label = f"{human_tokens(row.get('tokens_seen'))} tok"
    if row.get("step") is not None:
        label += f" (step {row['step']})"
    return label


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: dict[str, tuple] = {}
    for r in rows:
        seen.setdefault(r["checkpoint"], (r.get("tokens_seen") or 0, r.get("step") or 0, column_label(r)))
    ordered = sorted(seen.items(), key=lambda kv: (kv[1][0], kv[1][1], kv[0]))
    return [(ckpt, info[2]) for ckpt, info in ordered]


def _fmt(value: float, stderr: Optional[float], metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if _is_percent(metric):
        text = f"{100 * value:.2f}"
        if stderr is not None and not math.isnan(stderr):
            text += f" ± {100 * stderr:.2f}"
        return text
    return f"{value:.4f}"


def table_rows(rows: list[dict[str, Any]], metrics: tuple[str, ...] = TABLE_METRICS) -> tuple[list[str], list[list[str]]]:
    cols = _columns(rows)
    header = ["task", "metric"] + [label for _, label in cols]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        if r["metric"].split("/")[0] not in metrics:
            continue
        cells.setdefault((r["task"], r["metric"]), {})[r["checkpoint"]] = _fmt(r["value"], r.get("stderr"), r["metric"])
    body = []
    for (task, metric), by_ckpt in sorted(cells.items(), key=lambda kv: (kv[0][1] == "bits_per_byte", kv[0])):
        unit = " (%)" if _is_percent(metric) else ""
        body.append([task, metric + unit] + [by_ckpt.get(ckpt, "") for ckpt, _ in cols])
    return header, body


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header, body = table_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(ROW_FIELDS)
    for r in sorted(rows, key=lambda r: (r.get("tokens_seen") or 0, r["task"], r["metric"])):
        writer.writerow([r.get(k) for k in ROW_FIELDS])
    return buf.getvalue()


def metrics_png(rows: list[dict[str, Any]], title: str) -> Optional[bytes]:
    """Accuracy per task (left) and bits per byte per domain (right) against tokens seen."""
    acc = [r for r in rows if r["metric"] == "acc"]
    bpb = [r for r in rows if r["metric"] == "bits_per_byte"]
    if not acc and not bpb:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, name) for p, name in ((acc, "accuracy"), (bpb, "bits per byte")) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), dpi=100, squeeze=False)
    for ax, (data, name) in zip(axes[0], panels):
        series: dict[str, list[tuple[float, float, float]]] = {}
        for r in data:
            series.setdefault(r["task"], []).append((r.get("tokens_seen") or 0, r["value"], r.get("stderr") or 0.0))
        for task, points in sorted(series.items()):
            points.sort()
            xs, ys, es = zip(*points)
            if name == "accuracy":
                ax.errorbar(xs, ys, yerr=[0 if math.isnan(e) else e for e in es], marker="o", capsize=3, label=task)
            else:
                ax.plot(xs, ys, marker="o", label=task)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: evaluation over training")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
