"""Row stages get batches bounded in bytes as well as rows: long documents cannot put a whole
part's text into one batch (the quality filter's working memory is ~25 bytes per character)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage as st
from pipeline.execute import PartJob, bounded_batches, run_row_part
from pipeline.stage import EmptyConfig, Part, RowStage


def _docs(sizes: list[int]) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(sizes))], "text": ["x" * n for n in sizes]})


def test_bounded_batches_cut_by_string_bytes_and_keep_every_row_in_order():
    table = _docs([3_000, 10, 10, 2_500, 700, 4_000, 1, 1])
    parts = bounded_batches(table, 3_100)
    assert pa.concat_tables(parts).equals(table)
    for p in parts:  # within the bound, or one row that alone exceeds it
        assert p.num_rows == 1 or sum(len(t) for t in p.column("text").to_pylist()) + 2 * p.num_rows <= 3_100
    assert [p.num_rows for p in parts] == [3, 1, 1, 1, 2]  # row bytes: 3002 12 12 | 2502 | 702 | 4002 | 3 3
    assert bounded_batches(table, 10**9) == [table]  # within the bound: the batch itself


class _Recorder(RowStage):
    Config = EmptyConfig
    seen: list[int] = []

    def process_batch(self, batch: pa.Table) -> pa.Table:
        _Recorder.seen.append(sum(len(t) for t in batch.column("text").to_pylist()))
        return batch


def test_a_row_stage_never_gets_more_than_batch_bytes_of_text(tmp_path):
    sizes = [200_000] * 40 + [5] * 100 + [1_500_000]  # 9.5 MB of long documents and some short ones
    path = str(tmp_path / "in.parquet")
    pq.write_table(_docs(sizes), path)
    job = PartJob("recorder", 0, st.Storage(), str(tmp_path / "out"), "attempt-x", batch_size=2048, batch_bytes=1_000_000)
    _Recorder.seen = []
    result = run_row_part(_Recorder(EmptyConfig()), Part("p0", {"uri": path}), job)
    assert result.rows_in == len(sizes)
    assert sum(_Recorder.seen) == sum(sizes)
    assert max(_Recorder.seen) == 1_500_000  # the one document above the bound comes alone
    assert sorted(_Recorder.seen)[-2] <= 1_000_000
