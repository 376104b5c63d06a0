"""What says a source file changed: size and mtime (the default) or its content (``identity:
content``); and ``lmpipe explain`` says which rule decided."""

from __future__ import annotations

import json
import os

from pipeline.config import load_config
from pipeline.explain import explain, format_explanations
from pipeline.runner import Runner
from stages.ingest import identity

PIPELINE = """
name: ident
work_dir: {work}
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]{extra}}}]
"""


def _setup(tmp_path, rule: str | None):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps({"text": "first version"}) + "\n")
    (data / "b.jsonl").write_text(json.dumps({"text": "another file"}) + "\n")
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(work=tmp_path / "work", data=data, extra="" if rule is None else f", identity: {rule}"))
    Runner(load_config(path), use_ray=False, track=False).run()
    return path, data / "a.jsonl"


def _explain(path):
    items = explain(Runner(load_config(path), use_ray=False, track=False))
    return items[0], format_explanations(items)


def _touch(f):
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def _same_size_edit_keeping_mtime(f):
    st = os.stat(f)
    f.write_text(json.dumps({"text": "FIRST VERSION"}) + "\n")  # same length
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns


def test_by_default_touch_reruns_and_a_same_size_edit_keeping_the_mtime_is_not_seen(tmp_path):
    path, a = _setup(tmp_path, None)
    _touch(a)
    item, text = _explain(path)
    assert item.status == "will run"
    assert any("files identified by size and mtime/ETag" in r and a.name in r for r in item.reasons), item.reasons
    Runner(load_config(path), use_ray=False, track=False).run()
    _same_size_edit_keeping_mtime(a)
    item, _ = _explain(path)
    assert item.status == "cached"  # the documented fault of the size/mtime rule


def test_with_content_identity_touch_reuses_the_cache_and_a_same_size_edit_reruns(tmp_path):
    path, a = _setup(tmp_path, "content")
    _touch(a)
    item, text = _explain(path)
    assert item.status == "cached" and "source files identified: docs: by content (sha256)" in text
    _same_size_edit_keeping_mtime(a)
    item, _ = _explain(path)
    assert item.status == "will run"
    assert [r for r in item.reasons if "external input" in r] == [
        f"external input docs: 1 file(s) added, removed or modified, files identified by content (sha256): {a}"]


def test_switching_the_rule_is_named(tmp_path):
    path, _ = _setup(tmp_path, None)
    path.write_text(path.read_text().replace('.jsonl"]}]', '.jsonl"], identity: content}]'))
    item, _ = _explain(path)
    assert "external input docs: files now identified by content (sha256) (were by size and mtime/ETag)" in item.reasons


def test_content_hashes_are_cached_per_file_and_read_again_only_after_a_rewrite(tmp_path, monkeypatch):
    path, a = _setup(tmp_path, "content")
    reads = []
    real = identity.sha256_of
    monkeypatch.setattr(identity, "sha256_of", lambda storage, uri: reads.append(uri) or real(storage, uri))
    _explain(path)
    assert reads == []  # both files' hashes come from the cache
    _touch(a)
    _explain(path)
    assert reads == [str(a)]  # only the touched file is read again
    _explain(path)
    assert reads == [str(a)]


def test_content_identity_of_an_object_is_cached_under_its_etag(tmp_path, s3_env, monkeypatch):
    from pipeline.storage import Storage
    from tests.conftest import make_bucket, s3_filesystem

    make_bucket(s3_env, "ident")
    fs = s3_filesystem(s3_env)
    fs.pipe("ident/a.jsonl", b'{"text": "first version"}\n')
    storage = Storage({"s3": {"endpoint_url": s3_env["endpoint_url"]}})
    reads = []
    real = identity.sha256_of
    monkeypatch.setattr(identity, "sha256_of", lambda s, uri: reads.append(uri) or real(s, uri))
    first = identity.content_identity(storage, "s3://ident/a.jsonl", str(tmp_path / "work"))
    assert identity.content_identity(storage, "s3://ident/a.jsonl", str(tmp_path / "work")) == first and len(reads) == 1
    fs.pipe("ident/a.jsonl", b'{"text": "FIRST VERSION"}\n')  # same size, new bytes: a new ETag
    second = identity.content_identity(storage, "s3://ident/a.jsonl", str(tmp_path / "work"))
    assert len(reads) == 2 and second["size"] == first["size"] and second["sha256"] != first["sha256"]
