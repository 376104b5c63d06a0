"""Extractors that misbehave on purpose, for the extract_html tests (``extractor: function``)."""

from __future__ import annotations

import ctypes
import re

HANG = "MAKE-THE-EXTRACTOR-LOOP"
CRASH = "MAKE-THE-EXTRACTOR-CRASH"
GREEDY = "MAKE-THE-EXTRACTOR-EAT-MEMORY"


def misbehaving(html: str) -> str:
    """Loops in C on a page holding HANG (a regular expression with exponential backtracking: the
    ``re`` engine never returns to the interpreter, so no Python signal handler can stop it),
    dies on a page holding CRASH (a segmentation fault), asks for 16 GiB on a page holding GREEDY, else returns the page's text."""
    if HANG in html:
        re.fullmatch(r"(x+x+)+y", "x" * 64)
    if CRASH in html:
        ctypes.string_at(0)
    if GREEDY in html:
        bytearray(16 << 30)  # 16 GiB: over the worker's address-space limit
    return re.sub(r"<[^>]+>", " ", html).strip()
