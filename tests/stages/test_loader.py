"""TokenShardLoader: shapes, exact resume, disjoint ranks, determinism, zero-copy local reads, S3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.storage import Storage
from stages.tokenize.loader import TokenShardLoader

SEQ = 16


def write_shards(folder: Path, sizes=(50, 37, 13)) -> list[str]:
    """Row r of the corpus starts with token r (so a batch tells which sequences it holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    files, r = [], 0
    for k, n in enumerate(sizes):
        rows = np.arange(r, r + n)
        tokens = (rows[:, None] + np.arange(SEQ + 1)[None, :] * 1000) % 60000
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.astype(np.uint16).ravel()), SEQ + 1),
                          "source": ["x"] * n})
        path = folder / f"part-{k}.arrow"
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        files.append(str(path))
        r += n
    return files


@pytest.fixture
def files(tmp_path) -> list[str]:
    return write_shards(tmp_path / "shards")


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def ids(batches):
    return [b[0][:, 0].tolist() for b in batches]


def test_batches_shift_inputs_and_targets(files):
    loader = TokenShardLoader(files, batch_size=8, shuffle=False)
    x, y = next(iter(loader))
    assert x.dtype == torch.long and x.shape == (8, SEQ) and y.shape == (8, SEQ)
    assert x[:, 0].tolist() == list(range(8))
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert y[0, -1].item() == 16 * 1000  # the last token of sequence 0
    assert len(loader) == 100 // 8


def test_exact_resume_across_epochs(files):
    straight = take(TokenShardLoader(files, batch_size=8, seed=3), 30)  # 12 batches per epoch: crosses two epochs
    first = TokenShardLoader(files, batch_size=8, seed=3)
    head = take(first, 7)
    state = first.state_dict()
    resumed = TokenShardLoader(files, batch_size=8, seed=3)
    resumed.load_state_dict(state)
    tail = take(resumed, 23)
    assert ids(head + tail) == ids(straight)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(head + tail, straight))


def test_resume_after_state_taken_mid_iteration(files):
    loader = TokenShardLoader(files, batch_size=5, seed=1)
    it = iter(loader)
    for _ in range(25):
        next(it)
    state = dict(loader.state_dict())
    expected = [next(it) for _ in range(5)]
    again = TokenShardLoader(files, batch_size=5, seed=1)
    again.load_state_dict(state)
    assert ids(take(again, 5)) == ids(expected)


def test_ranks_get_disjoint_sequences(files):
    world = 3
    per_rank = [set(sum(ids(take(TokenShardLoader(files, 4, rank=r, world_size=world, seed=9), 8)), [])) for r in range(world)]
    assert all(len(s) == 32 for s in per_rank)  # 100 // 3 = 33 per rank -> 8 full batches of 4
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[0] & per_rank[2]) and not (per_rank[1] & per_rank[2])


def test_deterministic_for_seed_and_epochs_differ(files):
    a = ids(take(TokenShardLoader(files, 10, seed=5), 10))
    assert a == ids(take(TokenShardLoader(files, 10, seed=5), 10))
    assert a != ids(take(TokenShardLoader(files, 10, seed=6), 10))
    two_epochs = ids(take(TokenShardLoader(files, 10, seed=5), 20))
    assert sorted(sum(two_epochs[:10], [])) == list(range(100)) and two_epochs[:10] != two_epochs[10:]


def test_no_loop_stops_after_one_epoch(files):
    assert len(list(TokenShardLoader(files, 8, loop=False))) == 12


def test_state_from_another_configuration_is_refused(files):
    state = TokenShardLoader(files, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenShardLoader(files, 8, seed=2).load_state_dict(state)


def test_local_shards_are_memory_mapped_without_copies(files):
    loader = TokenShardLoader(files, 8)
    view = loader.shards[0].tokens
    assert view.dtype == np.uint16 and not view.flags.owndata and not view.flags.writeable


def test_reads_from_s3(s3_server, files, tmp_path):
    from tests.conftest import make_bucket

    make_bucket(s3_server, "shards")
    storage = Storage({"s3": {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": s3_server["secret"]}})
    remote = []
    for f in files:
        uri = f"s3://shards/tok/{Path(f).name}"
        storage.write_bytes_atomic(uri, Path(f).read_bytes())
        remote.append(uri)
    local = take(TokenShardLoader(files, 8, seed=2), 15)
    s3 = take(TokenShardLoader(remote, 8, seed=2, storage=storage), 15)
    assert ids(local) == ids(s3)
