"""The pipeline funnel: documents and characters in, and removed per stage and reason.

Logged on the pipeline's MLflow run as ``funnel.csv``, ``funnel.md`` and ``funnel.png``.
"""

from __future__ import annotations

import csv
import io
from typing import Any


def funnel_rows(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (stage, reason) removal plus one 'kept' row per stage, in run order; only
    stages whose counts are documents (not checkpoints, tokenizers or metric rows)."""
    manifests = [m for m in manifests if m.get("counts_unit", "documents") == "documents"]
    rows = []
    chars_of = {m["stage"]: m["datasets"].get("data", {}).get("chars", 0) for m in manifests}
    for m in manifests:
        c = m["counts"]
        inputs = m.get("inputs", [])
        chars_in = chars_of.get(inputs[0]["stage"], 0) if inputs else sum(d.get("chars", 0) for d in m["datasets"].values())
        base = {"stage": m["stage"], "docs_in": c["rows_in"], "chars_in": chars_in}
        for kind, key, ckey in (("rejected", "rejected", "chars_rejected"), ("quarantined", "quarantined", "chars_quarantined")):
            for reason, n in c[key].items():
                rows.append({**base, "outcome": kind, "reason": reason, "docs": n, "chars": c.get(ckey, {}).get(reason, 0)})
        rows.append({**base, "outcome": "kept", "reason": "", "docs": c["kept"], "chars": m["datasets"].get("data", {}).get("chars", 0)})
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["stage", "outcome", "reason", "docs", "chars", "docs_in", "chars_in"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in fields})
    return buf.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | outcome | reason | docs | % of stage input | chars | % of chars |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        pd = 100 * r["docs"] / r["docs_in"] if r["docs_in"] else 0.0
        pc_ = 100 * r["chars"] / r["chars_in"] if r["chars_in"] else 0.0
        lines.append(f"| {r['stage']} | {r['outcome']} | {r['reason']} | {r['docs']:,} | {pd:.2f}% | {r['chars']:,} | {pc_:.2f}% |")
    return "\n".join(lines) + "\n"


def to_png(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages: list[str] = []
    for r in rows:
        if r["stage"] not in stages:
            stages.append(r["stage"])
    palette = plt.get_cmap("Set2")
    colors: dict[str, Any] = {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.9 * len(stages)), squeeze=False)
    for ax, (unit, key) in zip(axes[0], (("documents", "docs"), ("characters", "chars"))):
        labels, kept, removed_parts = [], [], []
        for s in stages:
            srows = [r for r in rows if r["stage"] == s]
            labels.append(s)
            kept.append(next(r[key] for r in srows if r["outcome"] == "kept"))
            removed_parts.append([(r["reason"], r[key]) for r in srows if r["outcome"] != "kept"])
        y = list(range(len(stages)))[::-1]
        labelled: set[str] = {"kept"}
        ax.barh(y, kept, color="#4c72b0", label="kept")
        for yi, k, parts in zip(y, kept, removed_parts):
            left = k
            for reason, n in sorted(parts, key=lambda p: -p[1]):
                if reason not in colors:
                    colors[reason] = palette(len(colors) % 10)
                ax.barh(yi, n, left=left, color=colors[reason], label=None if reason in labelled else reason)
                labelled.add(reason)
                left += n
        ax.set_yticks(y, labels)
        ax.set_xlabel(unit)
        ax.set_title(f"{unit}: kept vs removed per reason")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def funnel_artifacts(manifests: list[dict[str, Any]]) -> dict[str, bytes]:
    rows = funnel_rows(manifests)
    if not rows:
        return {}
    return {"funnel.csv": to_csv(rows).encode(), "funnel.md": to_markdown(rows).encode(), "funnel.png": to_png(rows)}
