"""Extraction quality and speed on real pages whose source text is known, side by side.

Pages: the lxml.de pages of lxml's pinned source archive (21 with their reST source; their
sidebar menu, navigation and footers are real boilerplate), plus its Sphinx API pages for speed.
For each extractor: word recall and precision against the page's reST (bags of lower-cased
words), the fraction of internally indented code lines (``<pre>`` blocks) kept in place (same
indentation relative to the block's first line), docs/s of the raw extractor call on one core,
and docs/s of ``extract_html.process_batch`` (decoding, the worker process, Arrow) on the same pages,
interleaved with the raw calls, best of ``--repeat`` each.

    .venv/bin/python bench/extract_quality.py
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import time

import pyarrow as pa

WORD = re.compile(r"\w+")


def words(text: str) -> collections.Counter:
    return collections.Counter(w.lower() for w in WORD.findall(text))


RST_TARGET = re.compile(r"(?m)^\.\. _[^:]*:.*$")  # .. _name: URL (link targets: not shown on the page)
RST_DIRECTIVE = re.compile(r"(?m)^\s*\.\. [\w-]+::.*$|^\s*:[\w-]+:.*$")  # .. code:: python, :field: lines
RST_ROLE = re.compile(r":[\w-]+:`")  # :func:`name`
RST_LINK = re.compile(r"`([^`<]*)<[^>]*>`_+")  # `text <url>`_
URL = re.compile(r"\bhttps?://\S+")


def rst_text(source: str) -> str:
    """The words a reader sees on a page rendered from this reST: without link targets, directive
    lines, role names and URLs."""
    for pattern, repl in ((RST_TARGET, ""), (RST_DIRECTIVE, ""), (RST_ROLE, "`"), (RST_LINK, r"\1"), (URL, "")):
        source = pattern.sub(repl, source)
    return source


def recall_precision(extracted: str, source: str) -> tuple[float, float]:
    """Bag-of-words recall and precision of extracted text against the page's reST source."""
    got, want = words(extracted), words(rst_text(source))
    common = sum((got & want).values())
    return common / max(sum(want.values()), 1), common / max(sum(got.values()), 1)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def code_lines_kept(html: bytes, extracted: str) -> tuple[int, int]:
    """(kept, total) internally indented lines of the page's <pre> blocks."""
    import lxml.html

    tree = lxml.html.fromstring(html)
    lines_out = extracted.splitlines()
    positions = collections.defaultdict(list)
    for i, line in enumerate(lines_out):
        positions[line.strip()].append(i)
    kept = total = 0
    for pre in tree.iter("pre"):
        block = [ln.expandtabs() for ln in pre.text_content().splitlines() if ln.strip()]
        if len(block) < 2:
            continue
        base = _indent(block[0])
        indented = [ln for ln in block[1:] if _indent(ln) > base]
        total += len(indented)
        starts = positions.get(block[0].strip(), [])
        if not starts:
            continue
        # the occurrence of the block's first line after which the most lines are in place
        best = 0
        for start in starts:
            shift = _indent(lines_out[start].expandtabs()) - base
            out_set = {ln.expandtabs().rstrip() for ln in lines_out[start:start + 4 * len(block) + 10]}
            best = max(best, sum(1 for ln in indented if " " * (_indent(ln) + shift) + ln.strip() in out_set))
        kept += best
    return kept, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from stages.web import extractors
    from stages.web.extract_html import ExtractConfig, ExtractHtml
    from stages.web.pages import lxml_doc_pages

    labelled = [p for p in lxml_doc_pages() if p.source]
    speed_pages = lxml_doc_pages(include_api=True)
    print(f"load average {os.getloadavg()[0]:.2f}; {len(labelled)} labelled pages, {len(speed_pages)} pages for speed")
    print("| extractor | word recall (median / mean) | word precision (median / mean) | code lines in place | raw docs/s | stage docs/s | stage / raw |")
    print("|---|---|---|---|---:|---:|---:|")
    for name in ("resiliparse", "trafilatura"):
        extract = extractors.load(name, {})
        recalls, precisions, kept, total = [], [], 0, 0
        for page in labelled:
            text = extract(extractors.decode(page.html, "utf-8").text)
            r, p = recall_precision(text, page.source)
            recalls.append(r)
            precisions.append(p)
            k, t = code_lines_kept(page.html, text)
            kept, total = kept + k, total + t
        decoded = [extractors.decode(p.html, "utf-8").text for p in speed_pages]
        stage = ExtractHtml(ExtractConfig(extractor=name, timeout_seconds=60))
        stage.setup()
        batch = pa.table({"payload": pa.array([p.html for p in speed_pages], pa.large_binary()),
                          "content_type": ["text/html"] * len(speed_pages), "charset": ["utf-8"] * len(speed_pages)})
        raws, stages = [], []
        for _ in range(args.repeat):  # interleaved, so that a change of load touches both alike
            raws.append(_timed(lambda: [extract(h) for h in decoded]))
            stages.append(_timed(lambda: stage.process_batch(batch)))
        raw, staged = min(raws), min(stages)
        stage.worker.close()
        n = len(speed_pages)
        print(f"| {stage.label} | {statistics.median(recalls):.3f} / {statistics.mean(recalls):.3f} |"
              f" {statistics.median(precisions):.3f} / {statistics.mean(precisions):.3f} | {kept}/{total} = {kept / max(total, 1):.3f} |"
              f" {n / raw:.0f} | {n / staged:.0f} | {raw / staged:.2f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
