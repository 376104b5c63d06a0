"""PII masking: e-mail addresses, phone numbers, IP addresses (v4, v6) and payment card numbers.

Each span is replaced by a typed placeholder (Dolma's convention, e.g. ``|||EMAIL_ADDRESS|||``)
and counted per kind. One alternation scans each document once; candidates that a regex
alone cannot judge are checked in code: card numbers must pass the Luhn check and have a known
issuer prefix, IPv6 candidates must parse, IPv4 candidates right after "version"/"v" are left
alone (``v1.2.3.4``). Boundaries are strict so that version numbers, dates, decimal numbers and
``user@host`` inside URLs are not masked and text around a span is never touched.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional

import numpy as np
from pydantic import Field

from pipeline.config import StrictModel

PLACEHOLDERS = {
    "email": "|||EMAIL_ADDRESS|||",
    "phone": "|||PHONE_NUMBER|||",
    "ip": "|||IP_ADDRESS|||",
    "credit_card": "|||CREDIT_CARD|||",
}
KINDS = tuple(PLACEHOLDERS)

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_H = r"[0-9A-Fa-f]{1,4}"
PII_RE = re.compile(
    "|".join(
        [
            # not preceded by a character that would make it part of a URL's user:pass@ or a path
            r"(?P<email>(?<![\w.%+\-/:@])[A-Za-z0-9][A-Za-z0-9._%+\-]*@"
            r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+(?!(?:png|jpe?g|gif|svg|webp)\b)[A-Za-z]{2,24}(?![\w@\-]|\.\w))",
            r"(?P<card>(?<![\w.,\-+])\d(?:[ \-]?\d){12,18}(?![\w\-]|[.,]\d))",
            r"(?P<ipv4>(?<![\w.\-])" + _OCTET + r"(?:\." + _OCTET + r"){3}(?![\w\-]|\.\d))",
            r"(?P<ipv6>(?<![\w:.])(?:(?:" + _H + r":){7}" + _H + r"|(?:" + _H + r":){1,7}:(?:" + _H + r"(?::" + _H + r"){0,6})?|::" + _H + r"(?::" + _H + r"){0,6})(?![\w:]))",
            # North American numbers with separators: (555) 123-4567, 555-123-4567, +1 555.123.4567
            r"(?P<phone>(?<![\w+.\-/])(?:\+?1[ .\-]?)?(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w\-]|[.,]\d))",
            # international: +CC then 2-5 groups, 8-15 digits in all
            r"(?P<intl>(?<![\w+])\+\d{1,3}(?:[ .\-]?\(?\d{1,4}\)?){2,5}(?![\w\-]|[.,]\d))",
        ]
    )
)
_VERSION_BEFORE = re.compile(r"(?i)(?:\bv|version|release|build|ver\.?)\s*$")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|6(?:011|5|4[4-9])|3(?:0[0-5]|[68])|35)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def is_card(span: str) -> bool:
    digits = span.replace(" ", "").replace("-", "")
    if not 13 <= len(digits) <= 19 or not _CARD_PREFIX.match(digits):
        return False
    separators = {c for c in span if c in " -"}
    if len(separators) > 1:  # "4111 1111-1111 1111" is not how cards are written
        return False
    if separators:  # groups of 4 (Amex: 4-6-5)
        groups = [len(g) for g in re.split(r"[ \-]", span)]
        if not (all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4) and groups != [4, 6, 5]:
            return False
    return luhn_ok(digits)


class PiiConfig(StrictModel):
    kinds: list[str] = Field(default_factory=lambda: list(KINDS), description=f"which of {list(KINDS)} to mask")
    max_pii_spans: Optional[int] = Field(default=None, ge=0, description="drop documents with more spans than this; null keeps all")


def mask(text: str, kinds: frozenset[str]) -> tuple[str, dict[str, int]]:
    """The text with every PII span replaced by its placeholder, and counts per kind."""
    counts = dict.fromkeys(KINDS, 0)

    def replace(m: re.Match) -> str:
        kind = m.lastgroup
        span = m.group()
        if kind == "card":
            if not is_card(span):
                return span
            kind = "credit_card"
        elif kind == "ipv4":
            if _VERSION_BEFORE.search(text, max(0, m.start() - 10), m.start()):
                return span
            kind = "ip"
        elif kind == "ipv6":
            if not _valid_ipv6(span):
                return span
            kind = "ip"
        elif kind == "intl":
            if not 8 <= sum(c.isdigit() for c in span) <= 15:
                return span
            kind = "phone"
        if kind not in kinds:
            return span
        counts[kind] += 1
        return PLACEHOLDERS[kind]

    return PII_RE.sub(replace, text), counts


def _valid_ipv6(span: str) -> bool:
    try:
        ipaddress.IPv6Address(span)
    except ValueError:
        return False
    groups = [g for g in span.split(":") if g]
    # "::" alone or "a::b" shapes are too common in code (C++ scopes, slices) to be addresses
    return len(groups) >= 3 or (len(groups) >= 2 and any(len(g) == 4 for g in groups))


def mask_all(texts: list[str], cfg: PiiConfig) -> tuple[list[str], dict[str, np.ndarray]]:
    kinds = frozenset(cfg.kinds)
    out: list[str] = []
    counts = {k: np.zeros(len(texts), np.int64) for k in KINDS}
    for i, text in enumerate(texts):
        masked, c = mask(text, kinds)
        out.append(masked)
        for k, v in c.items():
            if v:
                counts[k][i] = v
    return out, counts
