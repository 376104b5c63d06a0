"""``url_filter``: drop documents by their URL -- block lists of domains and URLs from user files,
and banned words in the URL (the C4 / datatrove rules) -- with one reason per rule.

URLs are normalised before any comparison (``normalize_url``): scheme and host lower-cased, the
host in IDNA (punycode) form, a default port, the fragment and a trailing dot of the host
dropped. The registered domain comes from ``tldextract`` with the public suffix list that ships
inside the installed package (it is never fetched at run time); its version is in the stage's
fingerprint. Every row gets ``url_host`` and ``url_domain`` (the registered domain: ``bbc.co.uk``
for ``news.bbc.co.uk``), kept or not.

Rules, in order, each with its reason: ``url_blocked_domain`` (the host or any domain above it
is listed: a listed domain blocks its subdomains), ``url_blocked`` (the normalised URL is
listed), ``url_banned_word`` (a banned word is one of the URL's words: lower-cased runs of
letters and digits), ``url_soft_banned_words`` (at least ``soft_word_threshold`` soft-banned
words), ``url_banned_subword`` (a banned sub-word occurs in the URL with everything but letters
and digits removed). A missing URL is quarantined as ``missing_url`` and one that is not an
absolute http(s)/ftp URL with a host as ``invalid_url`` (set ``missing_url: keep`` for corpora
that mix documents with and without URLs).
"""

from __future__ import annotations

import hashlib
import re
from functools import cached_property
from typing import Any, Literal, Optional
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
from pydantic import Field, field_validator

from pipeline.config import PathStr, StrictModel
from pipeline.registry import register
from pipeline.stage import DROP_REASON, QUARANTINE_REASON, Resources, RowStage
from stages.columns import set_column

BLOCKED_DOMAIN = "url_blocked_domain"
BLOCKED_URL = "url_blocked"
BANNED_WORD = "url_banned_word"
SOFT_BANNED_WORDS = "url_soft_banned_words"
BANNED_SUBWORD = "url_banned_subword"
MISSING_URL = "missing_url"
INVALID_URL = "invalid_url"

SCHEMES = {"http": 80, "https": 443, "ftp": 21}
NOT_ALNUM = re.compile(r"[^a-z0-9]+")


class InvalidUrl(ValueError):
    pass


def normalize_url(url: str) -> tuple[str, str]:
    """(normalised URL, host) of an absolute http(s)/ftp URL; ``InvalidUrl`` otherwise."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise InvalidUrl(str(e)) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidUrl(f"scheme {parts.scheme!r} is not http, https or ftp" if scheme else "not an absolute URL")
    host = (parts.hostname or "").rstrip(".")
    if not host or any(ch.isspace() for ch in host):
        raise InvalidUrl("no host")
    host = _idna(host)
    netloc = host if port in (None, SCHEMES[scheme]) else f"{host}:{port}"
    if parts.username or parts.password:
        netloc = f"{parts.username or ''}{':' + parts.password if parts.password else ''}@{netloc}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, "")), host


def _idna(host: str) -> str:
    try:
        return host.lower().encode("idna").decode("ascii")
    except UnicodeError:
        return host.lower()  # not IDNA-encodable (e.g. an underscore label): compared as written


def url_words(url: str) -> set[str]:
    return set(NOT_ALNUM.split(url.lower())) - {""}


def _read_list(path: str) -> list[str]:
    """One entry per line; blank lines and '#' comments skipped."""
    return [line.strip() for line in _read(path).decode("utf-8").splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"url_filter: cannot read list file {path}: {e.strerror}") from None


class UrlFilterConfig(StrictModel):
    url_column: str = Field(default="url", description="the column holding the URL")
    blocked_domains: list[str] = Field(default_factory=list, description="domains to drop, with their subdomains")
    blocked_domain_files: list[PathStr] = Field(default_factory=list, description="local files of such domains, one per line ('#' comments)")
    blocked_urls: list[str] = Field(default_factory=list, description="URLs to drop (compared normalised)")
    blocked_url_files: list[PathStr] = Field(default_factory=list, description="local files of such URLs, one per line")
    banned_words: list[str] = Field(default_factory=list, description="a URL holding one of these as a word is dropped")
    banned_word_files: list[PathStr] = Field(default_factory=list, description="local files of banned words, one per line")
    soft_banned_words: list[str] = Field(default_factory=list, description="a URL holding soft_word_threshold of these is dropped")
    soft_word_threshold: int = Field(default=2, ge=1)
    banned_subwords: list[str] = Field(default_factory=list, description="a URL containing one of these (letters and digits"
                                                                          " only, lower case) anywhere is dropped")
    missing_url: Literal["quarantine", "keep"] = Field(default="quarantine", description="what a row without a URL gets")

    @field_validator("blocked_domain_files", "blocked_url_files", "banned_word_files")
    @classmethod
    def _local(cls, paths: list[str]) -> list[str]:
        for p in paths:
            if "://" in p:
                raise ValueError(f"{p}: block lists are read from local files (copy it next to the pipeline file)")
        return paths


@register
class UrlFilter(RowStage):
    name = "url_filter"
    version = "1"
    description = "Drop documents by domain/URL block lists (user files) and banned words in the URL, on normalised URLs (tldextract, bundled suffix list)."
    Config = UrlFilterConfig
    requires = ("url",)
    produces = ("url_host", "url_domain")
    resources = Resources(num_cpus=1, batch_size=4096)
    libraries = ("pyarrow", "tldextract")  # its bundled public suffix list decides url_domain

    def fingerprint_extras(self, ctx) -> dict[str, Any]:
        cfg: UrlFilterConfig = self.config
        files = [*cfg.blocked_domain_files, *cfg.blocked_url_files, *cfg.banned_word_files]
        digests = {}
        for path in files:
            digests[path] = hashlib.sha256(_read(path)).hexdigest()
        return {"list_files_sha256": digests}

    @cached_property
    def _extract(self):
        from tldextract import TLDExtract

        # the suffix list bundled with the package: no network, no cache folder written
        return TLDExtract(suffix_list_urls=(), cache_dir=None)

    @cached_property
    def _rules(self) -> dict[str, Any]:
        cfg: UrlFilterConfig = self.config
        domains = [d for path in cfg.blocked_domain_files for d in _read_list(path)] + list(cfg.blocked_domains)
        urls = [u for path in cfg.blocked_url_files for u in _read_list(path)] + list(cfg.blocked_urls)
        words = [w for path in cfg.banned_word_files for w in _read_list(path)] + list(cfg.banned_words)
        normalized_urls = set()
        for u in urls:
            try:
                normalized_urls.add(normalize_url(u if "://" in u else "http://" + u)[0])
            except InvalidUrl as e:
                raise ValueError(f"url_filter: blocked URL {u!r} is not a URL ({e})") from None
        subwords = sorted({NOT_ALNUM.sub("", w.lower()) for w in cfg.banned_subwords} - {""})
        return {
            "domains": {_idna(d.strip(".")) for d in domains},
            "urls": normalized_urls,
            "words": {w.lower() for w in words},
            "soft": {w.lower() for w in cfg.soft_banned_words},
            "subwords": re.compile("|".join(map(re.escape, subwords))) if subwords else None,
        }

    def setup(self) -> None:
        self._rules  # noqa: B018 - read the lists once per worker, and fail early on a bad entry
        self._extract  # noqa: B018

    def decide(self, url: Optional[str]) -> tuple[Optional[str], Optional[str], Optional[str], Optional[str]]:
        """(host, registered domain, drop reason, quarantine reason) of one URL."""
        if url is None or not url.strip():
            return None, None, None, (MISSING_URL if self.config.missing_url == "quarantine" else None)
        try:
            normalized, host = normalize_url(url)
        except InvalidUrl:
            return None, None, None, INVALID_URL
        parts = self._extract.extract_str(normalized)
        domain = parts.top_domain_under_public_suffix or host
        rules = self._rules
        labels = host.split(".")
        if any(".".join(labels[i:]) in rules["domains"] for i in range(len(labels))):
            return host, domain, BLOCKED_DOMAIN, None
        if normalized in rules["urls"]:
            return host, domain, BLOCKED_URL, None
        words = url_words(normalized)
        if rules["words"] and not rules["words"].isdisjoint(words):
            return host, domain, BANNED_WORD, None
        if rules["soft"] and len(rules["soft"] & words) >= self.config.soft_word_threshold:
            return host, domain, SOFT_BANNED_WORDS, None
        if rules["subwords"] is not None and rules["subwords"].search(NOT_ALNUM.sub("", normalized.lower())):
            return host, domain, BANNED_SUBWORD, None
        return host, domain, None, None

    def process_batch(self, batch: pa.Table) -> pa.Table:
        decisions = [self.decide(u) for u in batch.column(self.config.url_column).to_pylist()]
        hosts, domains, drops, quarantines = (list(col) for col in zip(*decisions)) if decisions else ([], [], [], [])
        out = batch
        for name, values in (("url_host", hosts), ("url_domain", domains), (DROP_REASON, drops), (QUARANTINE_REASON, quarantines)):
            out = set_column(out, name, pa.array(values, pa.string()))
        return out
