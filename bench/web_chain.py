"""WARC read -> HTML extraction, lmpipe against datatrove on the same WARC files, one core.

Files: the web demo's crawl (`write_demo_crawl`: lxml.de pages, API reference and other files of
lxml's pinned source archive, two gzipped WARC files; 125 records, 49 pages). Both sides run in
this process (no Ray, no executor), pinned to one core with their extraction worker processes
(run under ``taskset -c 1``):

* datatrove 0.10.1: ``WarcReader`` (warcio, cchardet, libmagic) -> ``Trafilatura`` extractor (its
  ``ExtractorSandbox`` worker process, per-page timeout);
* lmpipe: the ``warc_ingest`` reader -> ``extract_html`` ``process_batch`` (its worker process,
  per-page timeout), with trafilatura (the same extractor) and with resiliparse (the default).

Language, quality, toxicity and PII steps are not in this comparison (datatrove's need models and
word lists it downloads at run time); the filters are compared on their own in "Filters".

    taskset -c 1 .venv/bin/python bench/web_chain.py
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def run_datatrove(folder: str) -> tuple[int, float]:
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.readers import WarcReader

    t0 = time.perf_counter()
    reader = WarcReader(folder, glob_pattern="*.warc.gz")
    docs = list(Trafilatura(favour_precision=True, timeout=10).run(reader.run()))
    return len(docs), time.perf_counter() - t0


def run_lmpipe(folder: str, extractor: str, options: dict) -> tuple[int, float]:
    from stages.web import warc
    from stages.web.extract_html import ExtractConfig, ExtractHtml
    from stages.web.warc_ingest import PageRules, WarcIngestConfig, read_warc

    t0 = time.perf_counter()
    stage = ExtractHtml(ExtractConfig(extractor=extractor, options=options, timeout_seconds=10))
    stage.setup()
    rules = PageRules(WarcIngestConfig(sources=[{"name": "bench", "paths": [folder]}]))
    kept = 0
    for path in sorted(Path(folder).glob("*.warc.gz")):
        with open(path, "rb") as f:
            for table in read_warc(f, warc.compression_of(path.name), "bench", path.name, rules, 64):
                if "drop_reason" not in table.column_names:
                    continue
                pages = table.filter(pa.compute.is_null(table.column("drop_reason"))).drop_columns(["drop_reason"])
                if pages.num_rows:
                    out = stage.process_batch(pages)
                    kept += sum(1 for d, q in zip(out.column("drop_reason").to_pylist(), out.column("quarantine_reason").to_pylist())
                                if d is None and q is None)
    stage.worker.close()
    return kept, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from loguru import logger

    logger.remove()  # datatrove's progress lines
    from stages.web.pages import write_demo_crawl

    folder = tempfile.mkdtemp(prefix="lmpipe-web-chain-")
    write_demo_crawl(folder)
    size = sum(p.stat().st_size for p in Path(folder).glob("*.warc.gz"))
    print(f"load average {os.getloadavg()[0]:.2f}; {size / 1e6:.2f} MB of WARC, 125 records, 49 pages")
    runs = {"datatrove 0.10.1: WarcReader -> Trafilatura": lambda: run_datatrove(folder),
            # datatrove's Trafilatura defaults: favor_precision and deduplicate on
            "lmpipe: warc_ingest -> extract_html (trafilatura, datatrove's settings)":
                lambda: run_lmpipe(folder, "trafilatura", {"favor_precision": True, "deduplicate": True}),
            "lmpipe: warc_ingest -> extract_html (resiliparse, the default)": lambda: run_lmpipe(folder, "resiliparse", {})}
    results = {}
    for name, fn in runs.items():
        best = min((fn() for _ in range(args.repeat)), key=lambda r: r[1])
        results[name] = best
    base = results["datatrove 0.10.1: WarcReader -> Trafilatura"][1]
    print("| chain | documents out | s (best of %d) | pages/s | vs datatrove |" % args.repeat)
    print("|---|---:|---:|---:|---:|")
    for name, (n, seconds) in results.items():
        print(f"| {name} | {n} | {seconds:.2f} | {49 / seconds:.1f} | {base / seconds:.2f}x |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
