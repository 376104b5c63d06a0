"""The tokenize stage without a cluster (in-process runner): packing round trip, lineage,
mixture shares, validation per source, determinism of the shuffle, uniformity of the bucket rule and
of the in-bucket permutation, the shard layout (record batches, row counts), each packed byte read once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.io import read_table
from pipeline.runner import Runner
from pipeline.storage import Storage
from stages.assets import news_articles, python_doc_topics
from stages.tokenize.stage import mixture_rates
from stages.tokenize.packing import Stream, bucket_of, bucket_permutation, pack_stream

PIPELINE = """
name: tok-unit
work_dir: {work}
seed: {seed}
stages:
  ingest:
    uses: ingest
    config:
      sources:
        - {{name: news, paths: ["{data}/news/*.jsonl"]}}
        - {{name: docs, paths: ["{data}/docs/*.jsonl"]}}
  train_tokenizer:
    uses: train_tokenizer
    inputs: [ingest]
    config: {{vocab_size: 1000, sample_chars: 300000}}
  tokenize:
    uses: tokenize
    inputs: [ingest, train_tokenizer]
    config: {{seq_len: {seq_len}, validation_fraction: 0.1, shard_sequences: {shard}{extra}}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok-data")
    arts = [a["text"] for a in news_articles() if len(a["text"]) > 200][:120]
    topics = list(python_doc_topics().values())[:40]
    for name, texts, shards in (("news", arts, 2), ("docs", topics, 1)):
        (folder / name).mkdir()
        for k in range(shards):
            (folder / name / f"{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[k::shards]))
    return folder


def run(tmp: Path, data: Path, seed: int = 3, extra: str = "", seq_len: int = 128, shard: int = 100):
    path = tmp / "p.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_text(PIPELINE.format(work=tmp / "work", data=data, seed=seed, extra=extra, seq_len=seq_len, shard=shard))
    return Runner(load_config(str(path)), use_ray=False, track=False).run()


def shards(report, split: str) -> list[Path]:
    st = report.stage("tokenize")
    return [Path(st.stage_dir) / f["path"] for f in st.manifest["datasets"][split]["files"]]


@pytest.fixture(scope="module")
def natural(tmp_path_factory, data):
    return run(tmp_path_factory.mktemp("natural"), data)


def documents(report) -> dict[str, dict]:
    st = report.stage("ingest")
    rows = read_table(Storage(), [str(Path(st.stage_dir) / f["path"]) for f in st.manifest["datasets"]["data"]["files"]]).to_pylist()
    return {r["id"]: r for r in rows}


def reassemble(table: pa.Table, seq_len: int) -> dict[tuple[str, int], list[int]]:
    """(doc id, copy) -> its tokens, from the segments of every sequence, in seq_id order."""
    pieces: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    tokens = table.column("tokens").combine_chunks().values.to_numpy().reshape(-1, seq_len + 1)
    for row, (ids, offs, copies, seq_id) in enumerate(zip(*(table.column(c).to_pylist() for c in ("doc_ids", "doc_offsets", "doc_copies", "seq_id")))):
        ends = offs[1:] + [seq_len + 1]
        for d, o, e, c in zip(ids, offs, ends, copies):
            pieces.setdefault((d, c), []).append((seq_id, tokens[row, o:e]))
    return {k: np.concatenate([t for _, t in sorted(v, key=lambda x: x[0])]).tolist() for k, v in pieces.items()}


def test_packing_round_trip_returns_the_documents(natural):
    from tokenizers import Tokenizer

    m = natural.stage("tokenize").manifest["summary"]["data"]
    tok = Tokenizer.from_file(str(Path(natural.stage("tokenize").stage_dir) / m["tokenizer_path"]))
    tok.encode_special_tokens = True
    docs = documents(natural)
    eos = m["eos_id"]
    seen: set[str] = set()
    for split in ("train", "validation"):
        table = read_table(Storage(), [str(p) for p in shards(natural, split)])
        assert table.schema.field("tokens").type == pa.list_(pa.uint16(), 129)
        flat = table.column("tokens").combine_chunks().values.to_numpy()
        # every sequence is full: no padding anywhere
        assert len(flat) == table.num_rows * 129 and m["pad_id"] not in set(flat.tolist())
        partial = 0
        for (doc_id, copy), toks in reassemble(table, 128).items():
            assert copy == 0 and doc_id not in seen
            seen.add(doc_id)
            if toks[-1] != eos:  # cut by the split's dropped last partial sequence: a prefix of the document
                partial += 1
                full = tok.encode(docs[doc_id]["text"], add_special_tokens=False).ids + [eos]
                assert toks == full[: len(toks)]
                continue
            assert eos not in toks[:-1]
            assert tok.decode(toks[:-1], skip_special_tokens=False) == docs[doc_id]["text"]
        assert partial <= 3  # at most one per packed part (3 input files), all within the dropped < seq_len + 1 tokens
        tokens_total = sum(m["tokens"][split].values())
        assert tokens_total == table.num_rows * 129 + m["dropped_tail_tokens"][split]
    # the documents missing entirely fit in the two dropped tails
    assert len(docs) - len(seen) <= (m["dropped_tail_tokens"]["train"] + m["dropped_tail_tokens"]["validation"])


def test_validation_is_held_out_per_source_by_document(natural):
    m = natural.stage("tokenize").manifest["summary"]["data"]
    assert set(m["documents"]["validation"]) == {"news", "docs"}
    total = sum(sum(v.values()) for v in m["documents"].values())
    assert total == len(documents(natural))
    ids = {split: {d for row in read_table(Storage(), [str(p) for p in shards(natural, split)]).column("doc_ids").to_pylist() for d in row}
           for split in ("train", "validation")}
    assert not ids["train"] & ids["validation"]


def test_sequences_are_shuffled_and_the_manifest_says_what_training_needs(natural):
    st = natural.stage("tokenize")
    m = st.manifest["summary"]["data"]
    for key in ("seq_len", "vocab_size", "dtype", "eos_id", "bos_id", "pad_id", "tokenizer_path", "tokens", "mixture", "rows_per_batch"):
        assert key in m
    seq_ids = read_table(Storage(), [str(p) for p in shards(natural, "train")]).column("seq_id").to_numpy()
    assert sorted(seq_ids.tolist()) != seq_ids.tolist()  # shuffled
    assert len(set(seq_ids.tolist())) == len(seq_ids)
    assert st.manifest["datasets"]["train"]["rows"] == m["sequences"]["train"] == len(seq_ids)
    # one shard per bucket; B from the expected sequence count (~100 per shard), not from the workers
    files = st.manifest["datasets"]["train"]["files"]
    assert m["buckets"]["train"] == -(-len(seq_ids) // 100) and 1 <= len(files) <= m["buckets"]["train"]
    # record batches of a fixed size, said in the schema; the manifest's row counts are the shards'
    assert m["rows_per_batch"] == 2**20 // (129 * 2)
    for f in files:
        reader = pa.ipc.open_file(pa.memory_map(str(Path(st.stage_dir) / f["path"])))
        assert reader.schema.metadata[b"lmpipe.rows_per_batch"] == str(m["rows_per_batch"]).encode()
        sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        assert sum(sizes) == f["rows"] and all(n == m["rows_per_batch"] for n in sizes[:-1])
    # every packed byte is read back once by the writers (plus the files' footers)
    for split in ("train", "validation"):
        assert m["packed_bytes"][split] <= m["shuffle_bytes_read"][split] <= 1.1 * m["packed_bytes"][split]


def test_small_record_batches(tmp_path, data):
    # 8 KiB of uint16 tokens per batch at seq_len 255: 16 sequences; each shard is several batches
    report = run(tmp_path, data, seq_len=255, shard=60, extra=", record_batch_bytes: 8192")
    st = report.stage("tokenize")
    m = st.manifest["summary"]["data"]
    assert m["rows_per_batch"] == 16 and len(st.manifest["datasets"]["train"]["files"]) > 1
    for f in st.manifest["datasets"]["train"]["files"]:
        reader = pa.ipc.open_file(pa.memory_map(str(Path(st.stage_dir) / f["path"])))
        sizes = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        assert sum(sizes) == f["rows"] > 16 and sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16


def test_same_seed_same_bytes_other_seed_other_order(tmp_path, data, natural):
    again = run(tmp_path / "again", data)
    digest = lambda paths: [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert digest(shards(again, "train")) == digest(shards(natural, "train"))
    other = run(tmp_path / "other", data, seed=4)
    a = read_table(Storage(), [str(p) for p in shards(natural, "train")]).column("seq_id").to_pylist()
    b = read_table(Storage(), [str(p) for p in shards(other, "train")]).column("seq_id").to_pylist()
    assert a != b


def test_mixture_shares_within_tolerance(tmp_path, data):
    report = run(tmp_path, data, extra=", mixture: {news: 0.5, docs: 0.5}")
    m = report.stage("tokenize").manifest["summary"]["data"]
    shares = m["mixture"]["achieved_shares"]
    assert abs(shares["news"] - 0.5) < 0.03 and abs(shares["docs"] - 0.5) < 0.03
    assert m["mixture"]["rates"]["docs"] > 1 > m["mixture"]["rates"]["news"]  # docs upsampled, news downsampled
    table = read_table(Storage(), [str(p) for p in shards(report, "train")])
    copies = [c for row in table.column("doc_copies").to_pylist() for c in row]
    assert max(copies) >= 1  # repeated documents are told apart by their copy number
    # shares measured on the shards themselves (by segment lengths) agree with the manifest
    by_source = {}
    docs = documents(report)
    for ids, offs in zip(table.column("doc_ids").to_pylist(), table.column("doc_offsets").to_pylist()):
        for d, o, e in zip(ids, offs, offs[1:] + [129]):
            by_source[docs[d]["source"]] = by_source.get(docs[d]["source"], 0) + e - o
    total = sum(by_source.values())
    assert abs(by_source["docs"] / total - 0.5) < 0.03


def test_mixture_rates():
    assert mixture_rates({"a": 100, "b": 300}, None, None) == {"a": 1.0, "b": 1.0}
    r = mixture_rates({"a": 100, "b": 300}, {"a": 1, "b": 1}, None)
    assert r == {"a": 2.0, "b": 200 / 300}
    assert mixture_rates({"a": 100, "b": 300}, {"a": 1}, 50) == {"a": 0.5, "b": 0.0}
    with pytest.raises(ValueError, match="no training tokens"):
        mixture_rates({"a": 100}, {"a": 1, "zzz": 1}, None)


def test_pack_stream_lineage():
    s = Stream(np.arange(10, dtype=np.uint32), np.array([0, 3, 4]), pa.array(["x", "y", "z"]), pa.array(["s1", "s2", "s1"]), np.zeros(3, np.int32))
    table, tail = pack_stream(s, 3, pa.uint16(), 100)  # sequences of 4 tokens
    assert table.column("tokens").to_pylist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert table.column("doc_ids").to_pylist() == [["x", "y"], ["z"]]
    assert table.column("doc_offsets").to_pylist() == [[0, 3], [0]]
    assert table.column("source").to_pylist() == ["s1", "s1"]
    assert table.column("seq_id").to_pylist() == [100, 101]
    assert tail.tokens.tolist() == [8, 9] and tail.seg_ids.to_pylist() == ["z"] and tail.seg_starts.tolist() == [0]


def test_bucket_rule_and_in_bucket_permutation_are_deterministic_and_uniform():
    ids = (np.arange(20_000, dtype=np.int64) + (3 << 32))
    a = bucket_of(ids, 5, "train", 10)
    assert (a == bucket_of(ids, 5, "train", 10)).all()
    assert not (a == bucket_of(ids, 6, "train", 10)).all() and not (a == bucket_of(ids, 5, "validation", 10)).all()
    counts = np.bincount(a, minlength=10)  # consecutive seq_ids spread evenly: chi-square, 9 dof
    assert ((counts - 2000) ** 2 / 2000).sum() < 27.9  # p = 0.001
    assert (bucket_permutation(1000, 5, "train", 2) == bucket_permutation(1000, 5, "train", 2)).all()
    assert not (bucket_permutation(1000, 5, "train", 2) == bucket_permutation(1000, 5, "train", 3)).all()
    # where element 0 lands, and which element lands first, over 4000 seeds: chi-square, 9 dof
    n, trials = 10, 4000
    lands = np.zeros(n)
    first = np.zeros(n)
    for seed in range(trials):
        p = bucket_permutation(n, seed, "train", 0)
        lands[np.nonzero(p == 0)[0][0]] += 1
        first[p[0]] += 1
    expected = trials / n
    for counts in (lands, first):
        assert ((counts - expected) ** 2 / expected).sum() < 27.9


def test_loader_reads_the_stage_output(natural):
    from stages.tokenize.loader import TokenShardLoader, shard_files

    st = natural.stage("tokenize")
    files = shard_files(Storage(), st.stage_dir, "train")
    assert [Path(f) for f in files] == shards(natural, "train")
    x, y = next(iter(TokenShardLoader(files, batch_size=4, seed=0)))
    assert x.shape == (4, 128) and (x[:, 1:] == y[:, :-1]).all()
    assert shard_files(Storage(), st.stage_dir, "validation")


def test_validation_thresholds_hold_out_at_least_min_docs_per_source():
    from stages.tokenize.packing import (is_validation, merge_score_summaries, summarize_scores, thresholds_from_summary,
                                         validation_thresholds)

    ids = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(300)] + ["c0"]
    sources = ["a"] * 5 + ["b"] * 300 + ["c"]
    th = validation_thresholds(ids, sources, 0.05, 2, seed=1)
    held = {s: sum(is_validation(i, th[s], 1) for i, src in zip(ids, sources) if src == s) for s in th}
    assert held["a"] == 2  # 5% of 5 rounds to none: the minimum applies
    assert 5 <= held["b"] <= 30  # ~5% of 300
    assert held["c"] == 0  # a source's only document trains
    assert validation_thresholds(["x0", "x1"], ["x", "x"], 0.99, 5, 1)["x"] < 1  # never all of a source
    # the driver sees per part only the k smallest scores per source: merged, the same thresholds
    # as over all documents at once, so the minimum holds however the documents are split in files
    for min_docs in (0, 2, 7):
        whole = validation_thresholds(ids, sources, 0.01, min_docs, seed=1)
        parts = [summarize_scores(ids[k::4], sources[k::4], 1, min_docs) for k in range(4)]
        assert all(len(p[s]["smallest"]) <= min_docs for p in parts for s in p)
        assert thresholds_from_summary(merge_score_summaries(parts, min_docs), 0.01, min_docs) == whole
        held = {s: sum(is_validation(i, whole[s], 1) for i, src in zip(ids, sources) if src == s) for s in whole}
        assert held == {"a": min(min_docs, 4), "b": max(min_docs, held["b"]), "c": 0} and held["b"] >= min_docs


def test_bucketed_file_reads_one_bucket_and_names_a_truncated_file(tmp_path):
    from stages.tokenize.packing import read_bucket, sequence_schema, write_bucketed

    s = Stream(np.arange(40, dtype=np.uint32), np.arange(0, 40, 5), pa.array([f"d{i}" for i in range(8)]), pa.array(["s"] * 8),
               np.zeros(8, np.int32))
    table, _ = pack_stream(s, 3, pa.uint16(), 7 << 32)  # 10 sequences of 4 tokens
    uri = str(tmp_path / "packed.arrow")
    size = write_bucketed(Storage(), uri, table, 1, "train", 4)
    which = bucket_of(table.column("seq_id").to_numpy(), 1, "train", 4)
    got, read = [], 0
    for b in range(4):
        batch, n = read_bucket(Storage(), uri, size, b, 4, sequence_schema(3, pa.uint16()))
        ids = [] if batch is None else batch.column("seq_id").to_pylist()
        assert ids == table.column("seq_id").to_numpy()[which == b].tolist()  # the bucket, in packing order
        got += ids
        read += n
    assert sorted(got) == table.column("seq_id").to_pylist()
    assert read == size - 8 * 5 + 16 * 4  # every message once, plus 16 bytes of index per bucket
    Path(uri).write_bytes(Path(uri).read_bytes()[:-50])  # truncated: the index no longer fits the size
    with pytest.raises(ValueError, match="packed.arrow: bucket"):
        for b in range(4):
            read_bucket(Storage(), uri, size - 50, b, 4, sequence_schema(3, pa.uint16()))


def test_one_tokenizer_thread_runs_serially_in_a_shared_worker_and_leaves_its_environment_as_it_was(monkeypatch):
    """With one thread (the default) encoding runs in the run's shared workers, made serial for the
    call only; with more, the workers were started with threads_env and nothing is changed."""
    import os

    from stages.tokenize.packing import threads_env, tokenizer_threads

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with tokenizer_threads(1):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with tokenizer_threads(1):
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    with tokenizer_threads(4):
        assert "TOKENIZERS_PARALLELISM" not in os.environ
    assert threads_env(4)["RAYON_NUM_THREADS"] == "4"
