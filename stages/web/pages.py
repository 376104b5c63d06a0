"""Real web pages with their true text, from a pinned, checksummed package (``stages/assets.py``).

lxml's source archive ships the lxml.de website as HTML (``doc/html/*.html``: a navigation
sidebar, menus and footers around each page -- real boilerplate) next to the reStructuredText
each page was generated from (``doc/*.txt``), and its Sphinx API pages (``doc/html/apidoc``).
The demo crawl, the tests and the extraction benchmark are built from them.
"""

from __future__ import annotations

import io
import tarfile
import uuid
from dataclasses import dataclass
from typing import Iterable, Optional

from stages import assets

SITE = "https://lxml.de/"


@dataclass(frozen=True)
class Page:
    url: str
    html: bytes
    source: Optional[str]  # the reST the page was generated from, when the archive has it


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
