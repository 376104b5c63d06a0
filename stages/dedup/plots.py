"""PNG reports for MLflow: component sizes and the LSH S-curve."""

from __future__ import annotations

import io

import numpy as np


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def component_size_histogram(sizes: dict[int, int], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if sizes:
        xs = np.array(sorted(sizes))
        ax.bar(np.arange(len(xs)), [sizes[int(x)] for x in xs])
        ax.set_xticks(np.arange(len(xs)))
        ax.set_xticklabels([str(x) for x in xs], rotation=90 if len(xs) > 15 else 0, fontsize=7)
        ax.set_yscale("log")
    ax.set_xlabel("documents in component")
    ax.set_ylabel("components")
    ax.set_title(title)
    return _png(fig)


def s_curve(b: int, r: int, threshold: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.dedup.lsh import collision_probability

    s = np.linspace(0, 1, 201)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s, collision_probability(s, b, r), label=f"b={b}, r={r}")
    ax.axvline(threshold, color="grey", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("Jaccard similarity")
    ax.set_ylabel("P(candidate pair)")
    ax.set_title("LSH S-curve")
    ax.legend()
    return _png(fig)
