"""PII masking: e-mail addresses, phone numbers, IP addresses (v4, v6) and payment card numbers.

Each span is replaced by a typed placeholder (Dolma's convention, e.g. ``|||EMAIL_ADDRESS|||``)
and counted per kind. A loose RE2 gate per kind runs over the whole batch in Arrow, and only the
documents it flags are searched with that kind's exact pattern; candidates that a regex alone
cannot judge are checked in code: card numbers must pass the Luhn check and have a known
issuer prefix, IPv6 candidates must parse, IPv4 candidates right after "version"/"v" are left
alone (``v1.2.3.4``). Boundaries are strict so that version numbers, dates, decimal numbers and
``user@host`` inside URLs are not masked and text around a span is never touched.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
# One pattern per kind, applied in this order (earlier kinds win: a card number is never read as
# a phone number; placeholders hold no digits, so later passes cannot match inside them).
PATTERNS = {
    # not preceded by a character that would make it part of a URL's user:pass@ or a path
    "email": re.compile(
        r"(?<![\w.%+\-/:@])[A-Za-z0-9][A-Za-z0-9._%+\-]*@"
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+(?!(?:png|jpe?g|gif|svg|webp)\b)[A-Za-z]{2,24}(?![\w@\-]|\.\w)"
    ),
    "card": re.compile(r"(?<![\w.,\-+])\d(?:[ \-]?\d){12,18}(?![\w\-]|[.,]\d)"),
    "ipv4": re.compile(r"(?<![\w.\-])" + _OCTET + r"(?:\." + _OCTET + r"){3}(?![\w\-]|\.\d)"),
    "ipv6": re.compile(
        r"(?<![\w:.])(?:(?:" + _H + r":){7}" + _H + r"|(?:" + _H + r":){1,7}:(?:" + _H + r"(?::" + _H + r"){0,6})?|::" + _H + r"(?::" + _H + r"){0,6})(?![\w:])"
    ),
    # North American numbers with separators: (555) 123-4567, 555-123-4567, +1 555.123.4567
    "phone": re.compile(r"(?<![\w+.\-/])(?:\+?1[ .\-]?)?(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?![\w\-]|[.,]\d)"),
    # international: +CC then 2-5 groups, 8-15 digits in all
    "intl": re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .\-]?\(?\d{1,4}\)?){2,5}(?![\w\-]|[.,]\d)"),
}
# Loose RE2 versions (no look-arounds) that Arrow evaluates over a whole batch: a document is
# searched with a kind's real pattern only if it matches the loose one (most documents match none).
GATES = {
    "email": r"[A-Za-z0-9]@[A-Za-z0-9]",
    "card": r"\d(?:[ \-]?\d){12}",
    "ipv4": r"\d\.\d{1,3}\.\d{1,3}\.\d",
    "ipv6": r"[0-9A-Fa-f]:[0-9A-Fa-f]{0,4}:",
    "phone": r"\d{3}\)? ?[ .\-]?\d{3}[ .\-]\d{4}",
    "intl": r"\+\d",
}
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


def _accept(kind: str, m: re.Match, text: str) -> Optional[str]:
    """The PII kind of a regex match after the checks a regex cannot do, or None."""
    span = m.group()
    if kind == "card":
        return "credit_card" if is_card(span) else None
    if kind == "ipv4":
        return None if _VERSION_BEFORE.search(text, max(0, m.start() - 10), m.start()) else "ip"
    if kind == "ipv6":
        return "ip" if _valid_ipv6(span) else None
    if kind == "intl":
        return "phone" if 8 <= sum(c.isdigit() for c in span) <= 15 else None
    return kind


def mask(text: str, kinds: frozenset[str], passes=tuple(PATTERNS)) -> tuple[str, dict[str, int]]:
    """The text with every PII span replaced by its placeholder, and counts per kind."""
    counts = dict.fromkeys(KINDS, 0)
    for name in passes:
        def replace(m: re.Match, name=name) -> str:
            kind = _accept(name, m, text_now)
            if kind is None or kind not in kinds:
                return m.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text_now = text
        text = PATTERNS[name].sub(replace, text)
    return text, counts


def _valid_ipv6(span: str) -> bool:
    try:
        ipaddress.IPv6Address(span)
    except ValueError:
        return False
    groups = [g for g in span.split(":") if g]
    # "::" alone or "a::b" shapes are too common in code (C++ scopes, slices) to be addresses
    return len(groups) >= 3 or (len(groups) >= 2 and any(len(g) == 4 for g in groups))


def mask_all(texts: pa.Array, cfg: PiiConfig) -> tuple[list[str], dict[str, np.ndarray]]:
    kinds = frozenset(cfg.kinds)
    wanted = [k for k in PATTERNS if ("ip" if k.startswith("ip") else "phone" if k == "intl" else "credit_card" if k == "card" else k) in kinds]
    n = len(texts)
    gates = {k: pc.match_substring_regex(texts, GATES[k]).to_numpy(zero_copy_only=False) for k in wanted} if n else {}
    any_gate = np.zeros(n, bool)
    for g in gates.values():
        any_gate |= g
    out = texts.to_pylist()
    counts = {k: np.zeros(n, np.int64) for k in KINDS}
    for i in np.flatnonzero(any_gate).tolist():
        masked, c = mask(out[i], kinds, tuple(k for k in wanted if gates[k][i]))
        out[i] = masked
        for k, v in c.items():
            if v:
                counts[k][i] = v
    return out, counts
