"""One reader of the validation split for train and evaluate: the first N sequences per domain,
streamed shard by shard, stopping as soon as every domain is full."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.storage import Storage
from stages.tokenize.validation import first_per_domain
from stages.train.data import read_validation
from tests.stages.train_support import token_table, write_shards


class CountingStorage(Storage):
    """Counts the shards opened."""

    def __init__(self):
        super().__init__()
        self.opened: list[str] = []

    def arrow_fs(self, uri):
        self.opened.append(uri)
        return super().arrow_fs(uri)


def test_it_stops_once_every_domain_has_its_first_n(tmp_path):
    table = token_table(512, domains=("news", "code", "web"))  # 8 shards of 64 rows; far more than 5 x 3 domains
    files = write_shards(str(tmp_path / "validation"), table, rows_per_shard=64)
    storage = CountingStorage()
    sample = first_per_domain(files, storage, 5, domains=("news", "code", "web"))
    assert storage.opened == files[:1] and sample.shards_read == 1 and sample.rows_read == 64
    # the first 5 of each domain, in the split's order, in the shards' own dtype
    sources = table.column("source").to_pylist()
    keep = [i for d in ("news", "code", "web") for i in [j for j, s in enumerate(sources) if s == d][:5]]
    keep.sort()
    rows = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(512, -1)
    assert sample.tokens.dtype == np.uint16 and np.array_equal(sample.tokens, rows[keep])
    assert sample.sources == tuple(sources[i] for i in keep)


def test_without_the_domains_it_reads_everything_but_keeps_n_per_domain(tmp_path):
    files = write_shards(str(tmp_path / "validation"), token_table(512), rows_per_shard=64)
    sample = first_per_domain(files, None, 5)
    assert sample.shards_read == 8 and sample.rows_read == 512 and len(sample.sources) == 10
    assert len(first_per_domain(files, None, None).sources) == 512


def test_training_validation_uses_it_and_widens_only_what_it_keeps(tmp_path):
    files = write_shards(str(tmp_path / "validation"), token_table(512), rows_per_shard=64)
    storage = CountingStorage()
    sets = read_validation(files, storage, 4, domains=("news", "code"))
    assert len(storage.opened) == 1
    assert {d: tuple(t.shape) for d, t in sets.items()} == {"code": (4, 33), "news": (4, 33)}
    assert all(str(t.dtype) == "torch.int64" for t in sets.values())
    expected = first_per_domain(files, None, 4).by_domain()
    assert all(np.array_equal(sets[d].numpy(), expected[d]) for d in sets)


def test_a_split_whose_shards_hold_several_record_batches_is_read_batch_by_batch(tmp_path):
    table = token_table(256)
    path = tmp_path / "part-00000.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for offset in range(0, 256, 16):
            writer.write_table(table.slice(offset, 16))
    sample = first_per_domain([str(path)], None, 3, domains=("news", "code"))
    assert sample.rows_read == 16 and len(sample.sources) == 6
