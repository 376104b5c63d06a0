"""HTML -> text: charset decoding and the main-content extractors, as run inside the extraction
worker process (``sandbox.py``). Nothing here has a time limit of its own: the worker is killed
from outside when a page takes too long.

Extractors:

* ``resiliparse`` (DCLM's): ``extract_plain_text(main_content=True, preserve_formatting=True)`` --
  code blocks keep their line breaks and indentation, table rows stay one line each (cells
  separated by tabs); ~8x trafilatura's speed (BENCHMARKS.md).
* ``trafilatura`` (FineWeb's): ``extract(include_tables=True)``, plain text; tables as Markdown rows.
* ``function``: a user's ``module:function`` taking the decoded HTML (str) and returning text.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import importlib.util
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Optional

# the libraries whose code decides an extractor's output, recorded in its rows and fingerprint
LIBRARIES = {
    "resiliparse": ("resiliparse",),
    "trafilatura": ("trafilatura", "lxml", "lxml_html_clean", "justext", "courlan", "htmldate"),
    "function": (),
}
# decoding uses resiliparse's detector whatever the extractor
DECODE_LIBRARIES = ("resiliparse",)
PLAIN_TYPES = ("text/plain",)

META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.IGNORECASE)
REPLACEMENT = "\ufffd"
MAX_REPLACEMENT_FRACTION = 0.01  # more undecodable bytes than this: the charset was not found


class Undecodable(ValueError):
    """No charset decodes the page."""


@dataclass(frozen=True)
class Decoded:
    text: str
    charset: str  # the codec used (Python's name)
    source: str  # declared (HTTP header) | meta (<meta charset>) | utf-8 | detected


def library_versions(extractor: str) -> dict[str, str]:
    out = {}
    for name in sorted(set(LIBRARIES[extractor]) | set(DECODE_LIBRARIES)):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def function_digest(path: str) -> str:
    """sha256 of a user extractor's module source: a change to it changes the stage's fingerprint."""
    module = path.split(":", 1)[0]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"extractor function {path!r}: module {module!r} not found")
    with open(spec.origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _codec(label: Optional[str]) -> Optional[str]:
    if not label:
        return None
    try:
        return codecs.lookup(label.strip().strip("'\"")).name
    except LookupError:
        return None


def _strict(payload: bytes, codec: str) -> Optional[str]:
    try:
        return payload.decode(codec)
    except UnicodeDecodeError:
        return None


def decode(payload: bytes, declared: Optional[str]) -> Decoded:
    """The page as text: the declared charset if it decodes the bytes, else a ``<meta>`` charset,
    else UTF-8, else what resiliparse's detector (uchardet) says, with replacement characters
    for what still does not decode -- unless they exceed 1%: then the page is ``Undecodable``."""
    if payload.startswith(codecs.BOM_UTF8):
        return Decoded(payload[len(codecs.BOM_UTF8):].decode("utf-8", "replace"), "utf-8", "bom")
    meta = META_CHARSET.search(payload[:4096])
    for label, source in ((declared, "declared"), (meta.group(1).decode("ascii", "replace") if meta else None, "meta"),
                          ("utf-8", "utf-8")):
        codec = _codec(label)
        if codec is not None:
            text = _strict(payload, codec)
            if text is not None:
                return Decoded(text, codec, source)
    from resiliparse.parse.encoding import detect_encoding

    codec = _codec(detect_encoding(payload))
    if codec is None:
        raise Undecodable("no charset found (declared, <meta>, UTF-8 and detection all failed)")
    text = payload.decode(codec, "replace")
    bad = text.count(REPLACEMENT)
    if bad > MAX_REPLACEMENT_FRACTION * max(len(text), 1):
        raise Undecodable(f"{bad} of {len(text)} characters do not decode as {codec} (detected); declared {declared!r}")
    return Decoded(text, codec, "detected")


def _resiliparse(options: dict) -> Callable[[str], str]:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    kwargs = {"main_content": True, "preserve_formatting": True, "alt_texts": False, "links": False, **options}

    def run(html: str) -> str:
        tree = HTMLTree.parse(html)
        if kwargs["main_content"]:
            keep_shallow_lists(tree)
        return extract_plain_text(tree, **kwargs)

    return run


# resiliparse's main-content rules: a <ul> fewer than this many levels below <body> is dropped as
# navigation, and a list whose link text is over this share of its text is a link cluster
_SHALLOW_LIST_DEPTH = 4
_LINK_CLUSTER_RATIO = 0.2


def keep_shallow_lists(tree) -> None:
    """Keep the bullet lists of flat pages in resiliparse's main content.

    resiliparse drops every <ul> fewer than four levels below <body> as navigation, whatever it
    holds, so the bullet points of a page with flat markup (docutils and Sphinx pages, hand-written
    HTML) vanish from the text, a whole page when its body is one list. Navigation is a list of
    links: a shallow list that is *not* a link cluster by resiliparse's own test (link text at
    most 20% of its text) is moved under plain <div>s to that depth, where resiliparse's other
    rules (class and id names, link clusters) still judge it."""
    body = tree.body
    if body is None:
        return
    # Only lists fewer than _SHALLOW_LIST_DEPTH levels below <body> are candidates: found by
    # walking those top levels, in document order (walking up from every <ul> of a large page, as
    # a first version did, cost 3.5x the extraction itself). Moving a list only makes lists deeper,
    # so each candidate's depth is taken again when its turn comes.
    for ul in _shallow_lists(body, 1):
        depth, node = 0, ul
        while node is not None and node.tag != "body":
            depth, node = depth + 1, node.parent
        if node is None or depth >= _SHALLOW_LIST_DEPTH:
            continue
        text = _collapsed_bytes(ul.text)
        links = sum(_collapsed_bytes(a.text) for a in ul.get_elements_by_tag_name("a"))
        if text == 0 or links / text > _LINK_CLUSTER_RATIO:
            continue
        parent = ul.parent
        wrapper = tree.create_element("div")
        parent.replace_child(wrapper, ul)
        inner = wrapper
        for _ in range(_SHALLOW_LIST_DEPTH - depth - 1):
            inner = inner.append_child(tree.create_element("div"))
        inner.append_child(ul)


def _shallow_lists(node, depth: int) -> list:
    """The <ul> elements among ``node``'s descendants fewer than _SHALLOW_LIST_DEPTH levels below
    <body> (its children at ``depth``), in document order."""
    found = []
    child = node.first_element_child
    while child is not None:
        if child.tag == "ul":
            found.append(child)
        if depth + 1 < _SHALLOW_LIST_DEPTH:
            found += _shallow_lists(child, depth + 1)
        child = child.next_element_sibling
    return found


def _collapsed_bytes(text: str) -> int:
    return len(" ".join(text.split()).encode())


def _trafilatura(options: dict) -> Callable[[str], str]:
    import trafilatura

    kwargs = {"include_tables": True, "include_comments": False, "deduplicate": False, "output_format": "txt",
              "with_metadata": False, **options}

    from trafilatura.utils import load_html

    def run(html: str) -> str:
        tree = load_html(html)
        if tree is None:
            return ""
        keep_quoted_code(tree)
        return trafilatura.extract(tree, **kwargs) or ""

    return run


def keep_quoted_code(tree) -> None:
    """Keep the line breaks and indentation of code blocks that sit in a <blockquote>.

    trafilatura turns a <blockquote> into a quote and collapses the whitespace of everything in
    it, <pre> included, so an indented code block (docutils writes doctest blocks as
    <blockquote><pre>) comes out as one line. A blockquote that holds a <pre> is read as a plain
    <div>: the same text, with the <pre> handled as code."""
    for quote in tree.iter("blockquote"):
        if quote.find(".//pre") is not None:
            quote.tag = "div"


def _function(path: str) -> Callable[[str], str]:
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"extractor function {path!r}: write it as module:function")
    return getattr(importlib.import_module(module), name)


def load(extractor: str, options: dict, function: Optional[str] = None) -> Callable[[str], str]:
    if extractor == "resiliparse":
        return _resiliparse(options)
    if extractor == "trafilatura":
        return _trafilatura(options)
    if extractor == "function":
        return _function(function or "")
    raise ValueError(f"unknown extractor {extractor!r}")
