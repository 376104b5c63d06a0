"""warc_ingest: WARC/WET files of real pages (lxml.de, from lxml's pinned source archive) into
page rows; damaged members quarantined at their byte offsets; byte ranges read every record once."""

from __future__ import annotations

import collections
import gzip
import io

import pyarrow as pa
import pytest
import zstandard

from pipeline.config import load_config
from pipeline.io import read_table
from pipeline.runner import Runner
from stages.web import warc
from stages.web.pages import lxml_doc_pages, record_id, write_warc
from stages.web.warc_ingest import PageRules, WarcIngestConfig, page_id, read_warc
from tests.conftest import make_bucket, s3_filesystem


@pytest.fixture(scope="module")
def pages():
    return lxml_doc_pages()


def _crawl(pages, gzip_members: bool = True) -> bytes:
    """A crawl as a crawler writes it (warcinfo, request + response per page), plus what a crawl
    also holds: a 404, an image, a redirect."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out = io.BytesIO()
    writer = WARCWriter(out, gzip=gzip_members)
    info = {"WARC-Record-ID": record_id("crawl.warc.gz", "warcinfo"), "WARC-Date": "2026-01-01T00:00:00Z"}
    writer.write_record(writer.create_warc_record("", "warcinfo", payload=io.BytesIO(b"software: test\r\n"),
                                                  warc_content_type="application/warc-fields", warc_headers_dict=info))
    write_warc(out, pages[:20], gzip=gzip_members)
    extra = [("404 Not Found", "text/html", b"<html>gone</html>", "https://lxml.de/missing.html"),
             ("200 OK", "image/png", b"\x89PNG\r\n\x1a\n", "https://lxml.de/logo.png"),
             ("301 Moved Permanently", "text/html", b"", "https://lxml.de/old.html")]
    for status, ctype, body, url in extra:
        headers = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
        ids = {"WARC-Record-ID": record_id(url, "response"), "WARC-Date": "2026-01-01T00:00:00Z"}
        writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers,
                                                      warc_headers_dict=ids))
    write_warc(out, pages[20:], gzip=gzip_members)
    return out.getvalue()


def _rules(**overrides) -> PageRules:
    return PageRules(WarcIngestConfig(sources=[{"name": "lxml", "paths": ["/unused"]}], **overrides))


def _read(data: bytes, kind: str = "gzip", start: int = 0, end=None, **overrides) -> tuple[pa.Table, pa.Table]:
    tables = list(read_warc(io.BytesIO(data), kind, "lxml", "crawl.warc.gz", _rules(**overrides), 64, start, end))
    rows = [t for t in tables if "drop_reason" in t.column_names]
    bad = [t for t in tables if "quarantine_reason" in t.column_names]
    return (pa.concat_tables(rows) if rows else None), (pa.concat_tables(bad) if bad else None)


def _member_offsets(data: bytes) -> list[int]:
    """Where each gzip member starts, by warcio (the reference reader)."""
    from warcio.archiveiterator import ArchiveIterator

    it = ArchiveIterator(io.BytesIO(data))
    offsets = []
    for record in it:
        offsets.append(it.get_record_offset())
        record.content_stream().read()
    return offsets


def test_real_pages_become_rows_and_everything_else_a_reason(pages):
    data = _crawl(pages)
    rows, bad = _read(data)
    assert bad is None
    reasons = collections.Counter(rows.column("drop_reason").to_pylist())
    # 26 pages kept; 26 requests + the warcinfo are not responses; 404 and 301 by status; the image by type
    assert reasons == {None: 26, "not_a_response": 27, "http_status_not_ok": 2, "not_html": 1}
    kept = rows.filter(pa.compute.is_null(rows.column("drop_reason"))).to_pylist()
    by_url = {p.url: p for p in pages}
    assert sorted(r["url"] for r in kept) == sorted(by_url)
    for r in kept:
        assert r["payload"] == by_url[r["url"]].html  # the HTTP body, byte for byte
        assert (r["http_status"], r["content_type"], r["charset"], r["warc_type"]) == (200, "text/html", "utf-8", "response")
        assert r["crawl_date"] == "2026-01-01T00:00:00Z"
        assert r["warc_record_id"] == record_id(r["url"], "response") and r["id"] == page_id("lxml", r["warc_record_id"])
    # origins are the records' gzip member offsets, as warcio finds them
    offsets = _member_offsets(data)
    assert {int(r["origin"].split("@")[1]) for r in rows.to_pylist()} == set(offsets)
    # rejected rows carry no payload
    assert rows.filter(pa.compute.is_valid(rows.column("drop_reason"))).column("payload").null_count == 27 + 2 + 1


def test_truncated_member_is_quarantined_at_its_offset(pages):
    data = _crawl(pages)
    offsets = _member_offsets(data)
    cut = offsets[30] + 100  # inside the 31st member
    rows, bad = _read(data[:cut])
    assert rows.num_rows == 30  # every record before it, nothing after
    assert bad.num_rows == 1
    q = bad.to_pylist()[0]
    assert (q["quarantine_reason"], q["offset"]) == ("truncated_member", offsets[30])
    # the readers this stage frames records for stop at the same place without a word
    from fastwarc.warc import ArchiveIterator

    assert sum(1 for _ in ArchiveIterator(io.BytesIO(data[:cut]))) <= 31


def test_corrupt_member_is_quarantined_and_reading_resumes(pages):
    data = bytearray(_crawl(pages))
    offsets = _member_offsets(bytes(data))
    for i in range(offsets[10] + 40, offsets[10] + 60):  # deflate data of the 11th member
        data[i] ^= 0x5A
    rows, bad = _read(bytes(data))
    assert bad.num_rows == 1 and bad.column("quarantine_reason").to_pylist() == ["corrupt_member"]
    assert bad.column("offset").to_pylist() == [offsets[10]]
    assert rows.num_rows == len(offsets) - 1  # every other record, before and after it
    assert offsets[10] not in {int(o.split("@")[1]) for o in rows.column("origin").to_pylist()}


@pytest.mark.parametrize("step", [4096, 50_000, 333_333])
def test_byte_ranges_read_every_record_exactly_once(pages, step):
    data = _crawl(pages)
    whole, _ = _read(data)
    ids = []
    for start in range(0, len(data), step):
        end = start + step if start + step < len(data) else None
        part, bad = _read(data, start=start, end=end)
        assert bad is None
        ids += [] if part is None else part.column("id").to_pylist()
    assert ids == whole.column("id").to_pylist()


def test_plain_zstd_and_wet_files(pages):
    plain = _crawl(pages, gzip_members=False)
    rows, bad = _read(plain, "none")
    whole, _ = _read(_crawl(pages))
    assert bad is None and rows.drop_columns(["origin"]).equals(whole.drop_columns(["origin"]))
    cut, bad = _read(plain[:-500], "none")  # a plain file cut inside its last record
    assert bad.column("quarantine_reason").to_pylist() == ["truncated_member"] and cut.num_rows == rows.num_rows - 1

    frames = b"".join(zstandard.ZstdCompressor().compress(r.data) for r in warc.iter_records_in_bytes(plain, "none"))
    rows_zst, bad = _read(frames, "zstd")
    assert bad is None and rows_zst.column("id").equals(rows.column("id"))

    from warcio.warcwriter import WARCWriter

    wet = io.BytesIO()
    writer = WARCWriter(wet, gzip=True)
    writer.write_record(writer.create_warc_record("https://lxml.de/tutorial.html", "conversion",
                                                  payload=io.BytesIO("The lxml.etree Tutorial\nÉléments".encode()),
                                                  warc_content_type="text/plain"))
    rows, bad = _read(wet.getvalue())
    r = rows.to_pylist()[0]
    assert bad is None and r["drop_reason"] is None and r["warc_type"] == "conversion" and r["content_type"] == "text/plain"
    assert r["payload"].decode("utf-8") == "The lxml.etree Tutorial\nÉléments"


def test_files_that_are_not_warcs_get_a_reason():
    rows, bad = _read(gzip.compress(b'{"text": "a JSON line, not a WARC"}\n'))
    assert rows is None and bad.column("quarantine_reason").to_pylist() == ["unparseable_record"]
    rows, bad = _read(b"plain text, neither gzip nor WARC\n" * 10)
    assert rows is None and bad.column("quarantine_reason").to_pylist() == ["corrupt_member"]
    assert "does not decompress" in bad.column("detail")[0].as_py()


def test_oversized_payload_is_rejected_without_its_bytes(pages):
    rows, _ = _read(_crawl(pages), max_payload_bytes=50_000)
    big = [p.url for p in pages if len(p.html) > 50_000]
    assert big and sorted(r["url"] for r in rows.to_pylist() if r["drop_reason"] == "payload_too_large") == sorted(big)


def test_warc_ingest_on_s3_splits_a_big_file_and_counts_add_up(ray_local, s3_env, pipeline_file, tmp_path, pages):
    make_bucket(s3_env, "crawl")
    fs = s3_filesystem(s3_env)
    data = _crawl(pages)
    fs.pipe("crawl/2026/a.warc.gz", data)
    fs.pipe("crawl/2026/b.warc.gz", data[:len(data) // 2])  # truncated: one damaged member at its end
    path = pipeline_file(f"""
        name: warc-test
        work_dir: {tmp_path}/work
        mlflow: {{tracking_uri: "sqlite:///{tmp_path}/mlflow.db"}}
        storage:
          s3: {{endpoint_url: "{s3_env["endpoint_url"]}", key: "${{AWS_ACCESS_KEY_ID}}", secret: "${{AWS_SECRET_ACCESS_KEY}}"}}
        stages:
          crawl:
            uses: warc_ingest
            config:
              sources: [{{name: lxml, paths: ["s3://crawl/2026/"]}}]
              part_bytes: 65536
        """)
    loaded = load_config(path)
    report = Runner(loaded).run()
    m = report.stage("crawl").manifest
    assert m["parts"] > 2  # the files were split into byte ranges
    c = m["counts"]
    assert c["quarantined"] == {"truncated_member": 1}
    assert c["rows_in"] == c["kept"] + sum(c["rejected"].values()) + 1
    data_rows = read_table(loaded.storage, [f"{report.stage('crawl').stage_dir}/{f['path']}" for f in m["datasets"]["data"]["files"]])
    whole, _ = _read(data)
    half, _ = _read(data[:len(data) // 2])
    expected = [i for t in (whole, half) for i, r in zip(t.column("id").to_pylist(), t.column("drop_reason").to_pylist()) if r is None]
    assert data_rows.column("id").to_pylist() == expected  # in file order, each record once
    assert [f["uri"] for f in m["external_inputs"][0]["files"]] == ["s3://crawl/2026/a.warc.gz", "s3://crawl/2026/b.warc.gz"]


def test_a_50_mb_page_is_rejected_and_the_rest_is_read(pages):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out = io.BytesIO()
    write_warc(out, pages[:2])
    writer = WARCWriter(out, gzip=True)
    huge = b"<html><body>" + b"<p>a very long page</p>" * (50 * 2**20 // 23) + b"</body></html>"
    headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
    writer.write_record(writer.create_warc_record("https://lxml.de/huge.html", "response", payload=io.BytesIO(huge),
                                                  http_headers=headers))
    write_warc(out, pages[2:4])
    rows, bad = _read(out.getvalue())
    assert bad is None
    kept = rows.filter(pa.compute.is_null(rows.column("drop_reason")))
    assert kept.column("url").to_pylist() == [p.url for p in pages[:4]]
    big = rows.filter(pa.compute.equal(rows.column("url"), "https://lxml.de/huge.html")).to_pylist()
    assert [(r["drop_reason"], r["payload"]) for r in big] == [("payload_too_large", None)]
