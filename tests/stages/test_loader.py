"""TokenShardLoader: shapes, exact resume (same and other numbers of ranks), the order's statistics,
disjoint read sets, determinism, zero-copy local reads, S3 by byte range, bad shards and states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.storage import Storage
from stages.tokenize.loader import ROWS_PER_BATCH_KEY, ShardError, TokenShardLoader, feistel

SEQ = 16


def write_shards(folder: Path, sizes=(50, 37, 13), rows_per_batch=None, hint=None, start=0) -> list[str]:
    """Row r of the corpus starts with token r (so a batch tells which sequences it holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    files, r = [], start
    for k, n in enumerate(sizes):
        rows = np.arange(r, r + n)
        tokens = (rows[:, None] + np.arange(SEQ + 1)[None, :] * 1000) % 60000
        table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.astype(np.uint16).ravel()), SEQ + 1),
                          "source": ["x"] * n})
        if hint is not None:
            table = table.replace_schema_metadata({ROWS_PER_BATCH_KEY: str(hint)})
        path = folder / f"part-{k}.arrow"
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table, max_chunksize=rows_per_batch)
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


def flat(batches):
    return sorted(sum(ids(batches), []))


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


def test_ranks_get_disjoint_sequences_and_together_the_global_order(files):
    world = 3
    loaders = [TokenShardLoader(files, 4, rank=r, world_size=world, seed=9, streams=6) for r in range(world)]
    per_rank = [take(loader, 8) for loader in loaders]  # 100 // 12 = 8 global micro-batches
    sets = [set(flat(b)) for b in per_rank]
    assert all(len(s) == 32 for s in sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    # micro-batch j of all ranks is global positions [12j, 12j + 12): the world-size-independent order
    order = TokenShardLoader(files, 4, seed=9, streams=6).sequence_ids(0, np.arange(96))
    for j in range(8):
        dealt = [per_rank[r][j][0][:, 0].tolist() for r in range(world)]
        assert [dealt[p % world][p // world] for p in range(12)] == order[12 * j: 12 * j + 12].tolist()


def resume_on(files, world, mb, state, steps, **kw):
    """Each rank of a ``world``-rank run continuing from ``state`` for ``steps`` micro-batches."""
    out = []
    for r in range(world):
        loader = TokenShardLoader(files, mb, rank=r, world_size=world, **kw)
        loader.load_state_dict(state)
        out += take(loader, steps)
    return out


def test_resume_on_another_number_of_ranks_continues_the_global_order(tmp_path):
    files = write_shards(tmp_path / "s", sizes=(60, 36, 24), rows_per_batch=10)  # 120 sequences
    kw = dict(seed=4, streams=6, shuffle_window=4)
    straight = take(TokenShardLoader(files, 2, **kw), 90)  # 1.5 epochs on one rank, 2 per micro-batch
    two = [TokenShardLoader(files, 3, rank=r, world_size=2, **kw) for r in range(2)]
    head = sum((take(loader, 7) for loader in two), [])  # 42 sequences
    state = two[0].state_dict()
    assert state == two[1].state_dict() and state["position"] == 42
    for world, mb, steps in ((1, 6, 23), (3, 2, 23)):  # 42 + 138 = 180 = 1.5 epochs
        tail = resume_on(files, world, mb, state, steps, **kw)
        assert flat(head + tail) == flat(straight)  # none skipped, none repeated
    with pytest.raises(ValueError, match="world_size 4 does not divide the loader's streams=6"):
        TokenShardLoader(files, 2, rank=0, world_size=4, **kw)


def test_order_statistics(tmp_path):
    n, rows, streams = 20_000, 50, 16
    files = write_shards(tmp_path / "s", sizes=(8_000, 7_000, 5_000), rows_per_batch=rows)
    loader = TokenShardLoader(files, 8, seed=11, streams=streams, shuffle_window=64)
    assert loader.num_chunks == 400
    order = loader.sequence_ids(0, np.arange(n))
    assert np.array_equal(np.sort(order), np.arange(n))  # every sequence exactly once
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    assert abs(np.corrcoef(np.arange(n), position)[0, 1]) < 0.1  # corpus order does not survive
    following = loader.sequence_ids(1, np.arange(n))
    position1 = np.empty(n, dtype=np.int64)
    position1[following] = np.arange(n)
    assert abs(np.corrcoef(position, position1)[0, 1]) < 0.1  # epochs are independent orders
    # every fifth of the epoch is a uniform sample of the corpus: 5 x 5 cells, 800 expected in each
    cells = np.histogram2d(np.arange(n), order, bins=5, range=((0, n), (0, n)))[0]
    assert cells.min() >= 300 and cells.max() <= 1400, cells
    # neighbours in the order come from far apart: any 64 consecutive positions hold a chunk per stream
    chunks = order // rows
    assert min(len(set(chunks[i:i + 64])) for i in range(0, n - 64, 97)) >= streams
    # a chunk's sequences are spread over more than streams x rows positions, not bunched together
    spread = [np.ptp(position[c * rows:(c + 1) * rows]) for c in range(0, 400, 7)]
    assert np.median(spread) > streams * rows


def test_feistel_is_a_permutation_for_any_size():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        assert sorted(feistel(np.arange(n), n, 12345).tolist()) == list(range(n))
    a, b = feistel(np.arange(1000), 1000, 1), feistel(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b)
    sizes = np.array([7] * 7 + [9] * 9)  # per-element domains and keys (the windows of a stream)
    got = feistel(np.concatenate([np.arange(7), np.arange(9)]), sizes, np.array([5] * 7 + [6] * 9))
    assert sorted(got[:7].tolist()) == list(range(7)) and sorted(got[7:].tolist()) == list(range(9))


def test_ranks_read_disjoint_chunks(tmp_path):
    files = write_shards(tmp_path / "s", sizes=(400, 400), rows_per_batch=10)  # 80 chunks
    world, streams = 4, 8
    touched = []
    for r in range(world):
        loader = TokenShardLoader(files, 5, rank=r, world_size=world, seed=2, streams=streams, shuffle_window=16)
        positions = np.concatenate([loader.rank_positions(s) for s in range(0, 800, world * 5)])
        touched.append(set(loader.locate(0, positions)[0].tolist()))
    shared = set().union(*[touched[a] & touched[b] for a in range(world) for b in range(a + 1, world)])
    assert len(shared) <= streams  # only chunks cut by a stream boundary (one per boundary at most)
    assert set().union(*touched) == set(range(80))


def test_deterministic_for_seed_and_epochs_differ(files):
    a = ids(take(TokenShardLoader(files, 10, seed=5), 10))
    assert a == ids(take(TokenShardLoader(files, 10, seed=5), 10))
    assert a != ids(take(TokenShardLoader(files, 10, seed=6), 10))
    two_epochs = ids(take(TokenShardLoader(files, 10, seed=5), 20))
    assert sorted(sum(two_epochs[:10], [])) == list(range(100)) and two_epochs[:10] != two_epochs[10:]


def test_no_loop_stops_after_one_epoch(files):
    assert len(list(TokenShardLoader(files, 8, loop=False))) == 12


def test_state_from_another_run_is_refused(files, tmp_path):
    state = TokenShardLoader(files, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="loader state key 'seed' is 1, this loader has 2"):
        TokenShardLoader(files, 8, seed=2).load_state_dict(state)
    other = write_shards(tmp_path / "other", sizes=(50, 37, 13), rows_per_batch=10)  # same rows, other chunks
    with pytest.raises(ValueError, match="loader state key 'fingerprint'"):
        TokenShardLoader(other, 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="loader state key 'streams'"):
        TokenShardLoader(files, 8, seed=1, streams=8).load_state_dict(state)
    with pytest.raises(ValueError, match="version 1 is not 2"):
        TokenShardLoader(files, 8, seed=1).load_state_dict({**state, "version": 1})


def test_local_shards_are_memory_mapped_without_copies(files):
    loader = TokenShardLoader(files, 8)
    view = loader.chunk_tokens(0)
    assert view.dtype == np.uint16 and not view.flags.owndata and not view.flags.writeable


def test_bad_shards_are_one_line_naming_the_file(files, tmp_path):
    truncated = tmp_path / "truncated.arrow"
    truncated.write_bytes(Path(files[0]).read_bytes()[:-40])
    foreign = tmp_path / "notes.arrow"
    foreign.write_text("hello, not arrow\n" * 10)
    no_tokens = tmp_path / "no_tokens.arrow"
    with pa.OSFile(str(no_tokens), "wb") as f, pa.ipc.new_file(f, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": ["a"]}))
    wide = write_shards(tmp_path / "wide", sizes=(5,))[0]
    Path(wide).rename(tmp_path / "wide.arrow")
    cases = [(truncated, ShardError, "truncated"), (foreign, ShardError, "not an Arrow IPC file"),
             (no_tokens, ShardError, "no 'tokens' column"), (tmp_path / "gone.arrow", FileNotFoundError, "missing")]
    for bad, error, says in cases:
        with pytest.raises(error, match=f"{bad.name}.*{says}") as e:
            TokenShardLoader([files[0], str(bad)], 8)
        assert "\n" not in str(e.value)


def test_width_must_match(files, tmp_path):
    path = tmp_path / "w.arrow"
    t = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(10 * 9, np.uint16)), 9)})
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    with pytest.raises(ShardError, match="w.arrow: sequences of 9 tokens"):
        TokenShardLoader(files + [str(path)], 8)


def upload(storage, files, prefix):
    remote = []
    for f in files:
        uri = f"s3://shards/{prefix}/{Path(f).name}"
        storage.write_bytes_atomic(uri, Path(f).read_bytes())
        remote.append(uri)
    return remote


@pytest.fixture
def s3_storage(s3_server):
    from tests.conftest import make_bucket

    try:
        make_bucket(s3_server, "shards")
    except Exception as e:  # the bucket outlives one test: the moto server is session-wide
        assert "BucketAlready" in type(e).__name__ or "BucketAlready" in str(e)
    return Storage({"s3": {"endpoint_url": s3_server["endpoint_url"], "key": s3_server["key"], "secret": s3_server["secret"]}})


def test_reads_from_s3_by_record_batch(s3_storage, tmp_path):
    files = write_shards(tmp_path / "s", sizes=(200, 120, 80), rows_per_batch=20)  # 20 chunks of 20 rows
    hinted = write_shards(tmp_path / "h", sizes=(200, 120, 80), rows_per_batch=20, hint=20)
    remote = upload(s3_storage, files, "plain")
    local = take(TokenShardLoader(files, 8, seed=2, streams=4), 60)
    for uris in (remote, upload(s3_storage, hinted, "hinted")):
        loader = TokenShardLoader(uris, 8, seed=2, streams=4, cache_bytes=1 << 20, storage=s3_storage)
        start_bytes = loader.bytes_fetched  # footers (the files' last 16 KiB: here all of them) and headers
        assert start_bytes <= sum(Path(f).stat().st_size for f in files) + 20 * 300
        s3 = take(loader, 60)  # 480 sequences: all of epoch 0 and some of epoch 1
        assert ids(local) == ids(s3)
        blocks = [b[1] + b[2] for shard in loader.shards for b in shard.blocks]  # each batch's exact byte range
        reads = loader.stats()["chunks_fetched"]
        assert 20 <= reads <= 30  # each chunk once in epoch 0 (epoch 1's first chunks: cached or once more)
        assert reads * min(blocks) <= loader.bytes_fetched - start_bytes <= reads * max(blocks)
        loader.close()


def test_remote_errors(s3_storage, tmp_path):
    files = write_shards(tmp_path / "s", sizes=(40, 40), rows_per_batch=10)
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(Path(files[1]).read_bytes()[:-100])
    remote = upload(s3_storage, [files[0], str(cut)], "bad")
    with pytest.raises(ShardError, match="cut.arrow: not an Arrow IPC file"):
        TokenShardLoader(remote, 4, storage=s3_storage)
    with pytest.raises(FileNotFoundError, match="s3://shards/bad/absent.arrow: shard listed but missing"):
        TokenShardLoader([remote[0], "s3://shards/bad/absent.arrow"], 4, storage=s3_storage)
    lying = write_shards(tmp_path / "lie", sizes=(40,), rows_per_batch=15, hint=10)  # batches of 15, 15, 10
    loader = TokenShardLoader(upload(s3_storage, lying, "lie"), 4, shuffle=False, prefetch_threads=0, storage=s3_storage)
    with pytest.raises(ShardError, match=f"part-0.arrow: record batch 0 has 15 rows, its schema metadata {ROWS_PER_BATCH_KEY.decode()} gave 10"):
        take(loader, 1)
