"""TokenShardLoader: shapes, exact resume (same and other numbers of ranks), the order's statistics,
disjoint read sets, determinism, zero-copy local reads, S3 by byte range, bad shards and states."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.storage import Storage
from stages.tokenize.loader import TokenShardLoader
from stages.tokenize.order import feistel
from stages.tokenize.shard_index import ShardError
from stages.tokenize.shards import ROWS_PER_BATCH_KEY

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
    assert len(shared) <= world - 1  # only chunks cut by a boundary between two ranks' contiguous segments
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


def test_ranks_read_each_remote_chunk_about_once_per_epoch(s3_storage, tmp_path):
    files = write_shards(tmp_path / "s", sizes=(300, 300), rows_per_batch=10)  # 60 chunks
    remote = upload(s3_storage, files, "ranks")
    world, fetched = 4, 0
    for r in range(world):
        loader = TokenShardLoader(remote, 5, rank=r, world_size=world, seed=3, streams=8, shuffle_window=8,
                                  loop=False, storage=s3_storage)
        assert len(list(loader)) == 30
        fetched += loader.stats()["chunks_fetched"]
        loader.close()
    assert 60 <= fetched <= 60 + world - 1  # a chunk cut by a boundary between two ranks' segments is read by both


def test_a_ranks_streams_hold_contiguous_segments():
    from stages.tokenize.order import segment_of_stream

    for streams, worlds in ((64, (1, 2, 4, 8, 16, 32, 64)), (6, (1, 2, 6)), (12, (1, 2, 4, 12))):
        segment = segment_of_stream(streams)
        assert sorted(segment.tolist()) == list(range(streams))
        for world in worlds:
            for r in range(world):
                mine = sorted(segment[r::world].tolist())
                assert mine == list(range(mine[0], mine[0] + streams // world))


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


# -- training: checkpoint on 2 ranks, resume on 1 and on 3 (gloo, CPU) ---------------------------------

GLOBAL_BATCH, MICRO = 12, 2  # sequences per optimizer step; per micro-batch and rank (12 = 2 x 1 x 6 = 2 x 2 x 3 = 2 x 3 x 2)


class Recording:
    """A loader that remembers every micro-batch it handed out (tokens, ``[mb, seq_len + 1]``)."""

    resumes_on_any_world_size = True

    def __init__(self, loader):
        self.loader, self.batches = loader, []

    def __iter__(self):
        for x, y in self.loader:
            self.batches.append(torch.cat([x, y[:, -1:]], dim=1))
            yield x, y

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


class _Stop(Exception):
    pass


def _train(files, rank, world, root, resume=None, stop_at=None, model=None):
    """One rank of a run: returns the trainer and what its loader handed out."""
    from stages.model.transformer import model_config
    from stages.train.config import TrainConfig
    from stages.train.trainer import LocalCheckpointer, Trainer
    from tests.stages.train_support import SEQ_LEN

    cfg = TrainConfig(loop={"steps": 4, "micro_batch_size": MICRO, "global_batch_tokens": GLOBAL_BATCH * SEQ_LEN, "log_every": 1,
                            "eval_every": 0, "norms_every": 0, "spike_std": 0, "deterministic": False},
                      optimizer={"lr": 3e-3}, schedule={"warmup_steps": 1}, checkpoint={"every": 2})
    model = model or model_config("debug", dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=SEQ_LEN)
    loader = Recording(TokenShardLoader(files, MICRO, rank=rank, world_size=world, seed=7, streams=6, shuffle_window=4))
    trainer = Trainer(cfg, model, loader, SEQ_LEN, checkpointer=LocalCheckpointer(str(root)), seed=0)
    if resume:
        trainer.restore(resume)

    def stop(step):
        if step == stop_at:
            raise _Stop

    try:
        trainer.train(on_step_end=stop)
    except _Stop:
        pass
    return trainer, loader.batches


def _rank_main(rank, world, port, files, root, resume, stop_at, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        trainer, batches = _train(files, rank, world, root, resume, stop_at)
        torch.save({"batches": batches, "history": trainer.state.history}, str(Path(out) / f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world, files, root, out, resume=None, stop_at=None):
    import torch.multiprocessing as tmp

    from tests.conftest import free_port

    Path(out).mkdir(parents=True)
    tmp.start_processes(_rank_main, args=(world, free_port(), files, str(root), resume, stop_at, str(out)), nprocs=world,
                        start_method="spawn")
    return [torch.load(str(Path(out) / f"rank{r}.pt")) for r in range(world)]


def per_step(rank_batches: list[list[torch.Tensor]], world: int, first_step: int = 0) -> dict[int, list]:
    """The sorted token rows of each optimizer step, over all ranks."""
    accum = GLOBAL_BATCH // (world * MICRO)
    steps = {}
    for r, batches in enumerate(rank_batches):
        for i, b in enumerate(batches):
            steps.setdefault(first_step + i // accum + 1, []).extend(tuple(row) for row in b.tolist())
    return {k: sorted(v) for k, v in steps.items()}


def test_training_resumes_on_another_number_of_ranks(tmp_path):
    """A 2-rank run checkpoints at step 2 and stops; resumed on 3 ranks and on 1, each optimizer
    step sees exactly the sequences of the uninterrupted run's (36 sequences: the 4 steps of 12
    cross an epoch), and the model ends where the uninterrupted one does: DCP resharded the
    FSDP2 model and optimizer state."""
    from stages.model.checkpoint import load_full_model
    from stages.model.transformer import model_config
    from tests.stages.train_support import token_table, write_shards as write_token_shards

    files = write_token_shards(str(tmp_path / "shards"), token_table(36, seed=3), rows_per_shard=6)
    reference, ref_batches = _train(files, 0, 1, tmp_path / "ref")
    expected = per_step([ref_batches], 1)
    assert len(expected) == 4 and all(len(v) == GLOBAL_BATCH for v in expected.values())

    two = _spawn(2, files, tmp_path / "two", tmp_path / "out2", stop_at=2)
    head = per_step([r["batches"] for r in two], 2)
    assert head == {k: expected[k] for k in range(1, 3)}
    checkpoint = str(tmp_path / "two" / "step_00000002")

    three = _spawn(3, files, tmp_path / "three", tmp_path / "out3", resume=checkpoint)
    assert per_step([r["batches"] for r in three], 3, first_step=2) == {k: expected[k] for k in range(3, 5)}
    one, one_batches = _train(files, 0, 1, tmp_path / "one", resume=checkpoint)
    assert per_step([one_batches], 1, first_step=2) == {k: expected[k] for k in range(3, 5)}

    ref_loss = [h["loss"] for h in reference.state.history]
    for history in (three[0]["history"], one.state.history):
        assert [h["loss"] for h in history] == pytest.approx(ref_loss, rel=1e-4)
    for resumed in (load_full_model(str(tmp_path / "three" / "step_00000004")), one.model):
        for (name, a), b in zip(reference.model.state_dict().items(), resumed.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-4), (name, float((a - b).abs().max()))

    with pytest.raises(RuntimeError, match="step_00000002 holds another model: dim=32 \\(this run: 48\\)"):
        _train(files, 0, 1, tmp_path / "other", resume=checkpoint,
               model=model_config("debug", dim=48, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=32))


def test_the_prefetch_budget_counts_the_bytes_a_chunk_really_takes(files):
    """Cached chunks are views in the shards' dtype (uint16 here): the prefetch budget counts those
    bytes, not int64's four times as many (which let it read only a quarter as far ahead)."""
    loader = TokenShardLoader(files, batch_size=4, shuffle=False)
    sizes = [loader.chunk_bytes(c) for c in range(loader.num_chunks)]
    assert sizes == [loader.chunk_tokens(c).nbytes for c in range(loader.num_chunks)]
    assert sizes == [n * (SEQ + 1) * 2 for n in (50, 37, 13)]
