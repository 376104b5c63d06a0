"""Real web pages with their true text, from a pinned, checksummed package (``stages/assets.py``).

lxml's source archive ships the lxml.de website as HTML (``doc/html/*.html``: a navigation
sidebar, menus and footers around each page -- real boilerplate) next to the reStructuredText
each page was generated from (``doc/*.txt``), and its Sphinx API pages (``doc/html/apidoc``).
The demo crawl, the tests and the extraction benchmark are built from them.
"""

from __future__ import annotations

import io
import os
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from stages import assets

SITE = "https://lxml.de/"


@dataclass(frozen=True)
class Page:
    url: str
    html: bytes
    source: Optional[str]  # the reST the page was generated from, when the archive has it


ASSET_TYPES = {".css": "text/css", ".js": "application/javascript", ".png": "image/png"}


def lxml_doc_files(include_api: bool = False) -> tuple[list[Page], list[tuple[str, str, bytes]]]:
    """The site's pages and its other files ((URL, content type, bytes): stylesheets, scripts, images)."""
    asset = assets.ASSETS["lxml"]
    root = f"lxml-{asset.version}/doc/html/"
    files: list[tuple[str, str, bytes]] = []
    with tarfile.open(assets.fetch("lxml"), "r:gz") as t:
        for member in sorted(t.getmembers(), key=lambda m: m.name):
            rel = member.name[len(root):] if member.name.startswith(root) else ""
            ext = rel[rel.rfind("."):] if "." in rel else ""
            if member.isfile() and ext in ASSET_TYPES and (include_api or "/" not in rel):
                files.append((SITE + rel, ASSET_TYPES[ext], t.extractfile(member).read()))
    return lxml_doc_pages(include_api), files


def lxml_doc_pages(include_api: bool = False) -> list[Page]:
    """The lxml.de pages of lxml's source archive, sorted by URL; with ``include_api`` also the
    Sphinx API reference pages (no reST source)."""
    asset = assets.ASSETS["lxml"]
    root = f"lxml-{asset.version}/doc/"
    html: dict[str, bytes] = {}
    sources: dict[str, str] = {}
    with tarfile.open(assets.fetch("lxml"), "r:gz") as t:
        for member in t.getmembers():
            if not member.isfile() or not member.name.startswith(root):
                continue
            rel = member.name[len(root):]
            if rel.startswith("html/") and rel.endswith(".html") and (include_api or "/" not in rel[len("html/"):]):
                if "/_modules/" in rel or "/_sources/" in rel:
                    continue
                html[rel[len("html/"):]] = t.extractfile(member).read()
            elif "/" not in rel and rel.endswith(".txt"):
                sources[rel[:-len(".txt")]] = t.extractfile(member).read().decode("utf-8")
    pages = []
    for rel, body in sorted(html.items()):
        stem = rel[:-len(".html")]
        pages.append(Page(SITE + rel, body, sources.get(stem)))
    return pages


def record_id(url: str, record_type: str) -> str:
    """A WARC-Record-ID that is the same on every run (crawlers use random ones): the demo's
    WARC files, and so every output built from them, are byte-identical run after run."""
    return f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, record_type + ' ' + url)}>"


def write_warc(out: io.BufferedIOBase, pages: Iterable[Page], gzip: bool = True, with_requests: bool = True,
               date: str = "2026-01-01T00:00:00Z") -> None:
    """A WARC of ``pages`` as a crawler writes it: a request and a response record per page
    (HTTP/1.1 200, ``text/html; charset=utf-8``), one gzip member per record."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    writer = WARCWriter(out, gzip=gzip)
    for page in pages:
        if with_requests:
            request = StatusAndHeaders(f"GET /{page.url[len(SITE):]} HTTP/1.1", [("Host", "lxml.de")], is_http_request=True)
            ids = {"WARC-Record-ID": record_id(page.url, "request"), "WARC-Date": date}
            writer.write_record(writer.create_warc_record(page.url, "request", http_headers=request, warc_headers_dict=ids))
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
        ids = {"WARC-Record-ID": record_id(page.url, "response"), "WARC-Date": date}
        writer.write_record(writer.create_warc_record(page.url, "response", payload=io.BytesIO(page.html), http_headers=headers,
                                                      warc_headers_dict=ids))


def write_demo_crawl(out_dir: str | os.PathLike) -> dict[str, int]:
    """The web demo's crawl: lxml.de as two gzipped WARC files, byte-identical on every run --
    the site's pages (request + response records) in the first, its API reference pages and the
    stylesheets, scripts and images both sites link to in the second (responses the ingest
    rejects as not_html)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pages, files = lxml_doc_files(include_api=True)
    site = [p for p in pages if "/apidoc/" not in p.url]
    api = [p for p in pages if "/apidoc/" in p.url]
    targets = [out / "crawl-00000.warc.gz", out / "crawl-00001.warc.gz"]
    for target, group in zip(targets, (site, api)):
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            write_warc(f, group)
            if group is api:
                writer = WARCWriter(f, gzip=True)
                for url, content_type, body in files:
                    headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
                    ids = {"WARC-Record-ID": record_id(url, "response"), "WARC-Date": "2026-01-01T00:00:00Z"}
                    writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers,
                                                                  warc_headers_dict=ids))
        tmp.replace(target)
    return {"web_pages": len(pages), "web_other_files": len(files)}
