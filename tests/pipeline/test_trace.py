"""lmpipe trace on a small real corpus (in-process, no Ray): a training step back to its shard rows,
documents and their history, and a document forward to where it went. The step mapping is checked
against the training loader itself, over epoch boundaries, on two ranks with gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.contracts import TraceError
from pipeline.runner import Runner
from pipeline.stage import stage_seed
from pipeline.trace import Tracer
from stages.assets import news_articles
from stages.train.steps import accumulation_steps, train_loader

DATA_STAGES = """
name: trace-test
work_dir: {work}
seed: 5
stages:
  ingest:
    uses: ingest
    config:
      sources:
        - {{name: news, paths: ["{data}/news.jsonl"], url_field: url}}
        - {{name: notes, paths: ["{data}/notes"], format: text}}
  sample:
    uses: sample
    inputs: [ingest]
    config: {{fraction: 0.75}}
  train_tokenizer:
    uses: train_tokenizer
    inputs: [sample]
    config: {{vocab_size: 512, sample_chars: 200000}}
  tokenize:
    uses: tokenize
    inputs: [sample, train_tokenizer]
    config: {{seq_len: 32, validation_fraction: 0.1, shard_sequences: 400, record_batch_bytes: 2048}}
"""
# 2 workers x 2 sequences x 2 micro-batches per step; enough steps to pass two epoch ends
TRAIN_STAGE = """
  train:
    uses: train
    inputs: [tokenize.train]
    config:
      model: {{size: debug}}
      loop: {{steps: {steps}, micro_batch_size: 2, global_batch_tokens: 256, loader_streams: 4, shuffle_window: 8}}
      cluster: {{num_workers: 2}}
"""
STEPS = 150
VARIANTS = """
variants:
  narrow_window: {stages: {train: {config: {loop: {shuffle_window: 2}}}}}
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    data = root / "data"
    (data / "notes").mkdir(parents=True)
    articles = [a for a in news_articles() if len(a["text"]) > 400][:12]
    lines = [json.dumps({"text": a["text"], "url": a["url"]}) for a in articles]
    lines.insert(3, json.dumps({"text": "   ", "url": "http://example.com/empty"}))  # line 4: quarantined (empty_text)
    (data / "news.jsonl").write_text("\n".join(lines) + "\n")
    for k in range(4):
        (data / "notes" / f"{k}.txt").write_text(articles[k]["text"][::-1])
    body = DATA_STAGES.format(work=root / "work", data=data)
    (root / "data.yaml").write_text(body)
    (root / "pipeline.yaml").write_text(body + TRAIN_STAGE.format(steps=STEPS))
    (root / "variants.yaml").write_text(body + TRAIN_STAGE.format(steps=STEPS) + VARIANTS)
    Runner(load_config(str(root / "data.yaml")), use_ray=False, track=False).run()
    return root


@pytest.fixture(scope="module")
def tracer(traced) -> Tracer:
    """One tracer for the tests that only ask (making one resolves the pipeline's fingerprints)."""
    return Tracer(load_config(str(traced / "pipeline.yaml")))


def _shard_tokens(shard: str, row: int) -> np.ndarray:
    reader = pa.ipc.open_file(pa.memory_map(shard))
    table = reader.read_all()
    return np.asarray(table.column("tokens")[row].values, dtype=np.int64)


def test_a_step_names_the_sequences_the_training_loader_yields_at_that_step(traced, tracer):
    """For every rank, the rows trace names for step N hold the tokens the loader (built as the
    launcher builds it) yields in step N's micro-batches -- also after the epochs wrap."""
    loaded = tracer.loaded
    tokenize = tracer.by_name["tokenize"]
    files = [str(traced / "work" / "tokenize" / tokenize.stage_dir.rsplit("/", 1)[1] / f["path"])
             for f in tokenize.manifest["datasets"]["train"]["files"]]
    loop = loaded.resolved_stage_configs["train"].loop
    accumulation = accumulation_steps(loop, 32, 2)
    assert accumulation == 2
    per_epoch_steps = len(train_loader(loop, files, 0, 2, stage_seed(5, "train"))) / accumulation
    assert per_epoch_steps * 2 < STEPS, "the test must cross epoch ends"
    steps = [1, 2, int(per_epoch_steps) + 1, int(2 * per_epoch_steps) + 2, STEPS]
    for rank in (0, 1):
        loader = train_loader(loop, files, rank, 2, stage_seed(5, "train"))
        batches = iter(loader)
        yielded: dict[int, list[np.ndarray]] = {}
        for step in range(1, STEPS + 1):
            rows = []
            for _ in range(accumulation):
                inputs, targets = next(batches)
                rows += [np.concatenate([i.numpy(), t.numpy()[-1:]]) for i, t in zip(inputs, targets)]
            if step in steps:
                yielded[step] = rows
        for step in steps:
            answer = tracer.step(step, rank, None)
            assert [s.position for s in answer["sequences"]] == list(range(4))
            for s, expected in zip(answer["sequences"], yielded[step]):
                assert s.step == step and s.rank == rank
                np.testing.assert_array_equal(_shard_tokens(s.shard, s.row), expected)
    # the epochs really wrapped: the last step reads epoch >= 2
    assert tracer.step(STEPS, 0, 0)["sequences"][0].epoch >= 2


def test_a_step_traces_its_documents_to_file_and_line_through_every_stage(traced, tracer):
    answer = tracer.step(7, None, None)
    assert len(answer["sequences"]) == 8  # 2 ranks x 2 micro-batches x 2 sequences
    assert not answer["trained"]
    segment_docs = {seg.doc_id for s in answer["sequences"] for seg in s.segments}
    assert {d.doc_id for d in answer["documents"]} == segment_docs
    news = Path(traced / "data" / "news.jsonl").read_text().splitlines()
    for doc in answer["documents"]:
        assert [r.stage for r in doc.stages] == ["ingest", "sample"]
        assert [r.status for r in doc.stages] == ["kept", "kept"]
        assert doc.stages[1].fields["sample_score"] < 0.75  # the decision the stage recorded
        assert doc.fate == "kept through sample"
        if doc.source == "news":  # the line it names holds the document's URL
            path, _, line = doc.location.rpartition(" line ")
            assert path == str(traced / "data" / "news.jsonl")
            assert json.loads(news[int(line) - 1])["url"] == doc.stages[0].fields["url"]
    for s in answer["sequences"]:  # segments tile the sequence
        assert s.segments[0].start == 0
        assert sum(seg.tokens for seg in s.segments) == 33


def test_a_document_goes_forward_to_the_steps_that_read_it(tracer):
    seq = tracer.step(3, 1, 2)["sequences"][0]
    doc_id = seq.segments[-1].doc_id
    doc = tracer.document(doc_id)["document"]
    reads = [(s.step, s.rank, s.position) for s in doc.sequences if s.step is not None]
    assert (3, 1, 2) in reads
    assert all(s.split in ("train", "validation") for s in doc.sequences)
    # every read it lists names a row that holds the document, and trace --step agrees
    for s in doc.sequences[:5]:
        if s.step is not None:
            again = tracer.step(s.step, s.rank, s.position)["sequences"][0]
            assert (again.shard, again.row) == (s.shard, s.row)
            assert doc_id in {g.doc_id for g in again.segments}


def test_a_dropped_document_names_its_stage_rule_and_recorded_decision(traced, tracer):
    from pipeline.trace_index import read_column

    sample, ingest = tracer.by_name["sample"], tracer.by_name["ingest"]
    files = [f"{sample.stage_dir}/{f['path']}" for f in sample.manifest["datasets"]["rejected"]["files"]]
    dropped = [i for f in files for i in read_column(tracer.storage, f, "id").to_pylist()]
    assert dropped
    for doc_id in dropped:
        doc = tracer.document(doc_id)["document"]
        assert doc.fate == "dropped at sample (sampled_out)"
        assert doc.stages[-1].fields["sample_score"] >= 0.75
        assert doc.sequences == []
        if doc.source == "notes":
            assert doc.location.startswith(str(traced / "data" / "notes")) and doc.location.endswith(".txt #0")
        else:
            assert doc.location.startswith(f"{traced / 'data' / 'news.jsonl'} line ")
    # the empty line 4 of news.jsonl: quarantined at ingest, with file and line
    files = [f"{ingest.stage_dir}/{f['path']}" for f in ingest.manifest["datasets"]["quarantine"]["files"]]
    (bad_id,) = read_column(tracer.storage, files[0], "id").to_pylist()
    bad = tracer.document(bad_id)["document"]
    assert bad.fate == "quarantined at ingest (empty_text)"
    assert bad.location == f"{traced / 'data' / 'news.jsonl'} line 4"


def test_the_index_is_built_once_beside_the_outputs_and_changes_none_of_them(traced):
    def stage_files() -> dict[str, int]:
        work = traced / "work"
        return {str(p): p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and "_trace" not in p.parts}

    before = stage_files()
    tracer = Tracer(load_config(str(traced / "pipeline.yaml")))
    tracer.step(5, None, None)
    again = Tracer(load_config(str(traced / "pipeline.yaml")))
    again.step(6, None, None)
    assert again.index.built == []  # the first tracer (or an earlier test) built them; this one only read
    assert stage_files() == before
    indexes = list((traced / "work" / "_trace").rglob("*.parquet"))
    assert indexes and all(p.parts[-3] in ("ingest", "sample", "tokenize") for p in indexes)


def test_cli_text_json_and_one_line_errors(traced, capsys):
    path = str(traced / "pipeline.yaml")
    assert main(["trace", path, "--step", "2", "--rank", "0", "--position", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trace-test (variant base): step 2 of train") and "step 2 rank 0 position 1" in out
    assert "=> kept through sample" in out
    assert main(["trace", path, "--step", "2", "--rank", "1", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [s["rank"] for s in answer["sequences"]] == [1] * 4
    doc_id = answer["sequences"][0]["segments"][0]["doc_id"]
    assert main(["trace", path, "--doc", doc_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["document"]["doc_id"] == doc_id
    for argv, says in [
        (["--step", str(STEPS + 1)], f"step {STEPS + 1} is not a step of this training run (steps 1 to {STEPS})"),
        (["--step", "1", "--rank", "2"], "rank 2 is not a rank of this training run"),
        (["--shard", "part-99999-0000.arrow", "--row", "0"], "shard 'part-99999-0000.arrow' is not a shard of"),
        (["--step", "1", "--doc", "x"], "trace needs one of --step N, --shard FILE --row R, --doc ID"),
        (["--doc", "no-such-document"], "document 'no-such-document' is in no committed output of variant base"),
        (["--step", "1", "--variant", "other"], "--variant other: the file has no variants"),
    ]:
        assert main(["trace", path, *argv]) == 1
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert main(["trace", str(traced / "data.yaml"), "--step", "1"]) == 1
    err = capsys.readouterr().err
    assert "trace --step and --row read one train stage (found: none)" in err and err.count("\n") == 1
    # without a train stage a document still leads to the shard rows that hold it
    assert main(["trace", str(traced / "data.yaml"), "--doc", doc_id]) == 0
    out = capsys.readouterr().out
    assert "token sequence(s), no train stage reads them:" in out and "not read by training" not in out


def test_a_variant_is_traced_with_its_own_training_order(traced, tracer):
    """--variant NAME: the variant's train config decides the order (here its shuffle window); its
    data stages are the base's (same fingerprints), so no stage runs again."""
    variant = Tracer(load_config(str(traced / "variants.yaml")), "narrow_window")
    assert variant.variant == "narrow_window"
    assert variant.by_name["tokenize"].stage_dir == tracer.by_name["tokenize"].stage_dir
    loop = variant.loaded.resolved_stage_configs["train"].loop
    assert loop.shuffle_window == 2
    files = [f["path"] for f in variant.by_name["tokenize"].manifest["datasets"]["train"]["files"]]
    files = [f"{variant.by_name['tokenize'].stage_dir}/{f}" for f in files]
    ours = [(s.shard, s.row) for step in (1, 2, 3) for s in variant.step(step, 0, None)["sequences"]]
    base = [(s.shard, s.row) for step in (1, 2, 3) for s in tracer.step(step, 0, None)["sequences"]]
    assert ours != base
    loader = train_loader(loop, files, 0, 2, stage_seed(5, "train"))
    batches = iter(loader)
    expected = [np.concatenate([i.numpy(), t.numpy()[-1:]]) for _ in range(6) for i, t in zip(*next(batches))]
    assert [list(_shard_tokens(f, r)) for f, r in ours] == [list(e) for e in expected]


def test_a_shard_row_names_every_step_that_read_it(traced, tracer):
    """--shard FILE --row R: the row's documents, and each time training read it (about once per
    epoch: the run passes over the corpus about three times)."""
    seq = tracer.step(3, 1, 2)["sequences"][0]
    name = "/".join(seq.shard.rsplit("/", 2)[1:])  # train/part-...: the file name alone is also a validation shard's
    with pytest.raises(TraceError, match="names several shards of"):
        tracer.row(name.split("/")[1], seq.row)
    answer = tracer.row(name, seq.row)
    reads = [(s.step, s.rank, s.position) for s in answer["sequences"]]
    assert (3, 1, 2) in reads and len(reads) >= 2
    assert sorted({s.epoch for s in answer["sequences"]}) == list(range(len(reads)))
    for s in answer["sequences"]:
        again = tracer.step(s.step, s.rank, s.position)["sequences"][0]
        assert (again.shard, again.row) == (seq.shard, seq.row)
    assert {d.doc_id for d in answer["documents"]} == {g.doc_id for g in seq.segments}
    rows = next(f["rows"] for f in tracer.by_name["tokenize"].manifest["datasets"]["train"]["files"] if f["path"].endswith(name))
    with pytest.raises(TraceError, match=f"row {rows} is not a row of .*{name} \\(rows 0 to {rows - 1}\\)"):
        tracer.row(name, rows)
