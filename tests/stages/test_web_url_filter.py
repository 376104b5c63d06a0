"""url_filter: block lists from user files, banned words in the URL, normalised URLs, a reason per rule."""

from __future__ import annotations

import socket

import pyarrow as pa
import pytest

from stages.web.url_filter import UrlFilter, UrlFilterConfig, normalize_url


def _filter(tmp_path, **config) -> UrlFilter:
    (tmp_path / "domains.txt").write_text("# blocked domains\nbadsite.com\nexample.co.uk\nxn--bcher-kva.example\n")
    (tmp_path / "urls.txt").write_text("http://news.org/articles/1?x=2\n")
    stage = UrlFilter(UrlFilterConfig(blocked_domain_files=[str(tmp_path / "domains.txt")],
                                      blocked_url_files=[str(tmp_path / "urls.txt")], **config))
    stage.setup()
    return stage


def test_each_rule_has_its_reason(tmp_path):
    stage = _filter(tmp_path, banned_words=["casino"], soft_banned_words=["free", "bonus", "win"], banned_subwords=["porn"])
    urls = {
        "https://lxml.de/tutorial.html": (None, None),
        "https://BadSite.com./page": ("url_blocked_domain", None),             # case and a trailing dot
        "http://forums.shop.badsite.com/x": ("url_blocked_domain", None),       # subdomain of a listed domain
        "https://notbadsite.com/": (None, None),                                # a suffix, not a subdomain
        "http://news.example.co.uk:80/a": ("url_blocked_domain", None),         # default port dropped
        "https://co.uk/": (None, None),                                         # a public suffix is not the listed domain
        "http://bücher.example/kaufen": ("url_blocked_domain", None),           # IDNA: listed as punycode
        "HTTP://NEWS.ORG/articles/1?x=2#comments": ("url_blocked", None),       # scheme/host case, fragment
        "http://news.org/articles/1?x=3": (None, None),
        "https://games.example.com/casino-royale": ("url_banned_word", None),
        "https://example.com/casinos": (None, None),                            # a word, not a substring
        "https://example.com/free-bonus": ("url_soft_banned_words", None),
        "https://example.com/free-shipping": (None, None),
        "https://example.com/p-o-r-n-hub": ("url_banned_subword", None),
        "not a url": (None, "invalid_url"),
        "mailto:someone@example.com": (None, "invalid_url"),
        "http://": (None, "invalid_url"),
        "http://[::1/x": (None, "invalid_url"),
        None: (None, "missing_url"),
    }
    out = stage.process_batch(pa.table({"url": pa.array(list(urls), pa.string())}))
    got = list(zip(out.column("drop_reason").to_pylist(), out.column("quarantine_reason").to_pylist()))
    assert dict(zip(urls, got)) == urls
    domains = dict(zip(urls, out.column("url_domain").to_pylist()))
    assert domains["http://news.example.co.uk:80/a"] == "example.co.uk" and domains["http://forums.shop.badsite.com/x"] == "badsite.com"


def test_normalisation():
    assert normalize_url("HTTPS://Example.COM:443/a?b=1#frag") == ("https://example.com/a?b=1", "example.com")
    assert normalize_url("http://example.com:8080") == ("http://example.com:8080/", "example.com")
    assert normalize_url("http://bücher.example/")[1] == "xn--bcher-kva.example"


def test_suffix_list_is_never_fetched(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("url_filter opened a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    stage = _filter(tmp_path)
    out = stage.process_batch(pa.table({"url": ["https://www.bbc.co.uk/news", "https://user.github.io/x"]}))
    assert out.column("url_domain").to_pylist() == ["bbc.co.uk", "github.io"]  # ICANN suffixes only, as datatrove


def test_missing_list_file_and_keep_missing_urls(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        UrlFilter(UrlFilterConfig(blocked_domain_files=[str(tmp_path / "nope.txt")])).setup()
    with pytest.raises(ValueError, match="local files"):
        UrlFilterConfig(blocked_domain_files=["s3://bucket/list.txt"])
    stage = UrlFilter(UrlFilterConfig(missing_url="keep"))
    stage.setup()
    out = stage.process_batch(pa.table({"url": pa.array([None, "https://a.org/"], pa.string())}))
    assert out.column("quarantine_reason").to_pylist() == [None, None]
