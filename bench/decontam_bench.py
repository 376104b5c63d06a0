"""Decontamination throughput with MMLU's 14,042 questions indexed, and the index's memory.

Index: build time, size of the shared arrays (what every worker maps), and the build process's
RSS growth. Check: documents/s and MB/s of ``check_batch`` on one core over the real news
articles (3,824) and Python documentation topics, batches of 2,048, best of ``--rounds``.

    .venv/bin/python bench/decontam_bench.py [--match ngram|paragraph] [--rounds 3] [--out bench/results/decontam.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--match", choices=["ngram", "paragraph"], default="ngram", help="GPT-3 13-grams or Dolma paragraphs")
    ap.add_argument("--out", default=str(REPO / "bench/results/decontam.json"))
    args = ap.parse_args()

    import pyarrow as pa

    from stages.assets import news_articles, python_doc_topics
    from stages.decontaminate import Decontaminate, DecontaminateConfig
    from stages.decontaminate.ngrams import NgramIndex
    from stages.evalsets import load_mmlu

    texts = [a["text"] for a in news_articles()] + list(python_doc_topics().values())
    mmlu = load_mmlu()
    before = rss_mb()
    t = time.perf_counter()
    index = NgramIndex.build([mmlu]) if args.match == "ngram" else NgramIndex.build_paragraphs([mmlu])
    build = time.perf_counter() - t
    rss_growth = rss_mb() - before
    stage = Decontaminate(DecontaminateConfig(tasks=["mmlu"], match=args.match))
    chars = sum(len(x) for x in texts)
    best = None
    for _ in range(args.rounds):
        t = time.perf_counter()
        flagged = 0
        for i in range(0, len(texts), 2048):
            chunk = texts[i : i + 2048]
            out = stage.check_batch(pa.table({"id": [str(k) for k in range(len(chunk))], "text": chunk, "source": ["x"] * len(chunk)}), index)
            flagged += out.column("drop_reason").null_count != len(chunk)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    result = {
        "match": args.match,
        "examples": len(mmlu.examples),
        "index": {k: index.stats[k] for k in ("ngrams_kept", "ngrams_ignored_too_common", "vocab_words")},
        "index_bytes": index.nbytes,
        "index_parts_bytes": {"hashes": index.hashes.nbytes, "bitmap": index.bitmap.nbytes, "examples": index.example_index.nbytes + index.example_offsets.nbytes,
                              "vocab": index.vocab.nbytes},
        "build_seconds": build,
        "build_peak_rss_growth_mb": rss_growth,
        "docs": len(texts),
        "chars": chars,
        "seconds": best,
        "docs_per_s": len(texts) / best,
        "mb_per_s": chars / best / 1e6,
    }
    if args.match == "paragraph":
        args.out = args.out.replace(".json", "_paragraph.json")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
