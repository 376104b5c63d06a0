"""fastwarc vs warcio vs lmpipe's warc_ingest reader on the same WARC files, one core.

The files: the lxml.de pages and API pages of lxml's pinned source archive (49 real pages with
navigation boilerplate), written ``--copies`` times under distinct URLs as a crawler writes them
(request + response per page, one gzip member per record). Each reader goes through every record
and reads every payload. Then each reader gets the same file cut inside a member and the same
file with one member's deflate data damaged: how many records it returns, and whether it says so.

    .venv/bin/python bench/warc_readers.py --copies 40
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import time

from stages.web import warc
from stages.web.pages import lxml_doc_pages, write_warc
from stages.web.warc_ingest import PageRules, WarcIngestConfig, read_warc


def build(copies: int) -> bytes:
    pages = lxml_doc_pages(include_api=True)
    out = io.BytesIO()
    for c in range(copies):
        write_warc(out, [dataclasses.replace(p, url=p.url.replace("https://lxml.de/", f"https://lxml.de/c{c}/")) for p in pages])
    return out.getvalue()


def read_fastwarc(data: bytes) -> tuple[int, str]:
    from fastwarc.warc import ArchiveIterator

    n = 0
    try:
        for record in ArchiveIterator(io.BytesIO(data), parse_http=True):
            record.reader.read()
            n += 1
    except Exception as e:  # noqa: BLE001 - what it raises is the measurement
        return n, f"raises {type(e).__name__}: {e}"
    return n, "no error"


def read_warcio(data: bytes) -> tuple[int, str]:
    import contextlib

    from warcio.archiveiterator import ArchiveIterator

    n = 0
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            for record in ArchiveIterator(io.BytesIO(data)):
                record.content_stream().read()
                n += 1
    except Exception as e:  # noqa: BLE001
        return n, f"raises {type(e).__name__}: {e}"
    printed = err.getvalue().strip().splitlines()
    return n, f"prints {printed[0]!r} x{len(printed)}" if printed else "no error"


def read_lmpipe(data: bytes) -> tuple[int, str]:
    rules = PageRules(WarcIngestConfig(sources=[{"name": "bench", "paths": ["/unused"]}]))
    rows, damaged = 0, []
    for table in read_warc(io.BytesIO(data), "gzip", "bench", "bench.warc.gz", rules, 512):
        if "quarantine_reason" in table.column_names:
            damaged += [f"{r['quarantine_reason']} at byte {r['offset']}" for r in table.to_pylist()]
        else:
            rows += table.num_rows
    return rows, ("quarantines " + "; ".join(damaged)) if damaged else "no error"


def frame_only(data: bytes) -> tuple[int, str]:
    items = list(warc.iter_records_in_bytes(data, "gzip"))
    damaged = [f"{d.reason} at byte {d.offset}" for d in items if isinstance(d, warc.Damage)]
    return len(items) - len(damaged), ("reports " + "; ".join(damaged)) if damaged else "no error"


READERS = {"fastwarc 2.0.0 ArchiveIterator": read_fastwarc, "warcio 1.8.1 ArchiveIterator": read_warcio,
           "lmpipe framing only (stages/web/warc.py)": frame_only, "lmpipe warc_ingest reader (framing + fastwarc + rows)": read_lmpipe}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    data = build(args.copies)
    print(f"load average {os.getloadavg()[0]:.2f}; file: {len(data) / 1e6:.1f} MB gzip, {args.copies * 49 * 2} records")
    print("| reader | records | s (best of %d) | MB/s (compressed) | records/s |" % args.repeat)
    print("|---|---:|---:|---:|---:|")
    for name, fn in READERS.items():
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            n, _ = fn(data)
            best = min(best, time.perf_counter() - t0)
        print(f"| {name} | {n} | {best:.3f} | {len(data) / 1e6 / best:.1f} | {n / best:,.0f} |")

    from warcio.archiveiterator import ArchiveIterator

    it = ArchiveIterator(io.BytesIO(data))
    offsets = []
    for record in it:
        offsets.append(it.get_record_offset())
        record.content_stream().read()
    middle = offsets[len(offsets) // 2]
    truncated = data[:middle + 200]
    corrupt = bytearray(data)
    for i in range(middle + 40, middle + 60):
        corrupt[i] ^= 0x5A
    print(f"\ndamaged files: truncated inside the member at byte {middle} (record {len(offsets) // 2} of {len(offsets)});"
          f" the same member's deflate data damaged")
    print("| reader | truncated: records, what it says | corrupt: records, what it says |")
    print("|---|---|---|")
    for name, fn in READERS.items():
        n1, s1 = fn(truncated)
        n2, s2 = fn(bytes(corrupt))
        print(f"| {name} | {n1}, {s1[:90]} | {n2}, {s2[:90]} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
