"""Part outputs: rollover, Arrow IPC shards, counts and characters per reason, routing by reason."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.execute import split_by_reason
from pipeline.io import PartOutputs, read_table
from pipeline.storage import Storage


def test_routing_counts_and_rollover(tmp_path):
    out = PartOutputs(Storage(), str(tmp_path / "attempt-x"), "attempt-x", "00007", max_rows_per_file=2)
    table = pa.table({
        "id": ["a", "b", "c", "d", "e"],
        "text": ["keep", "too short", "keep me", "bad\x00", "x"],
        "drop_reason": [None, "short", None, None, "short"],
        "quarantine_reason": [None, None, None, "nul_byte", None],
    })
    split_by_reason(out, table)
    result = out.close()
    assert result.rows == {"data": 2, "rejected": 2, "quarantine": 1}
    assert result.reasons == {"rejected": {"short": 2}, "quarantine": {"nul_byte": 1}}
    assert result.reason_chars == {"rejected": {"short": 10}, "quarantine": {"nul_byte": 4}}
    assert [f.path for f in result.files["rejected"]] == ["attempt-x/rejected/part-00007-0000.parquet"]
    assert [f.rows for f in result.files["data"]] == [2]
    data = read_table(Storage(), [str(tmp_path / "attempt-x" / "data" / "part-00007-0000.parquet")])
    assert data.column_names == ["id", "text"] and data.column("id").to_pylist() == ["a", "c"]
    rejected = read_table(Storage(), [str(tmp_path / f.path) for f in result.files["rejected"]])
    assert "quarantine_reason" not in rejected.column_names and rejected.column("drop_reason").to_pylist() == ["short", "short"]


def test_arrow_ipc_shards_roll_over_and_read_back(tmp_path):
    out = PartOutputs(Storage(), str(tmp_path / "attempt-y"), "attempt-y", "00000", max_rows_per_file=3,
                      measure_column=None, formats={"train": "arrow"})
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(list(range(7 * 4)), pa.uint16()), 4)
    out.write("train", pa.table({"tokens": tokens}))
    result = out.close()
    files = result.files["train"]
    assert [f.path for f in files] == [f"attempt-y/train/part-00000-{i:04d}.arrow" for i in range(3)]
    assert [f.rows for f in files] == [3, 3, 1]
    back = read_table(Storage(), [str(tmp_path / f.path) for f in files])
    assert back.column("tokens").type == pa.list_(pa.uint16(), 4)
    assert back.column("tokens").to_pylist()[6] == [24, 25, 26, 27]
    with pa.memory_map(str(tmp_path / files[0].path)) as mm:  # zero-copy
        assert pa.ipc.open_file(mm).read_all().num_rows == 3


def test_missing_cluster_resources_fail_with_what_is_missing():
    import pytest

    from pipeline.runner import ResourcesUnavailable, check_cluster_resources
    from pipeline.stage import Resources

    cluster = {"CPU": 2.0, "memory": 1e9, "node:127.0.0.1": 1.0}
    check_cluster_resources("ingest", Resources(num_cpus=1), cluster)
    with pytest.raises(ResourcesUnavailable, match=r"stage 'train' needs 8 GPUs per worker; the cluster has 0 \(cluster resources: CPU=2\)"):
        check_cluster_resources("train", Resources(num_cpus=1, num_gpus=8), cluster)
    with pytest.raises(ResourcesUnavailable, match="needs 1 of resource 'tpu'"):
        check_cluster_resources("x", Resources(num_cpus=1, custom={"tpu": 1}), cluster)


def test_train_stage_refuses_a_cluster_without_its_gpus(ray_local):
    import pytest

    from pipeline.runner import ResourcesUnavailable
    from stages.train import TrainStage as Train

    from pipeline.fanout import FanOut

    class Ctx:
        stage_name = "train"
        fan_out = FanOut("train", on_ray=True)

    cfg = Train.Config.model_validate({"cluster": {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 1}}})
    with pytest.raises(ResourcesUnavailable, match=r"stage 'train' needs 8 GPUs \(8 workers x 1\); the cluster has 0"):
        Train._check_cluster(Ctx(), cfg)


def test_funnel_counts_documents_only():
    from pipeline.funnel import funnel_rows, to_markdown

    def manifest(stage, unit, rows_in, kept, rejected, chars, inputs=()):
        return {"stage": stage, "counts_unit": unit, "inputs": [{"stage": i} for i in inputs],
                "counts": {"rows_in": rows_in, "kept": kept, "rejected": rejected, "quarantined": {},
                           "chars_rejected": {k: 10 * v for k, v in rejected.items()}, "chars_quarantined": {}},
                "datasets": {"data": {"chars": chars}}}

    rows = funnel_rows([
        manifest("ingest", "documents", 10, 10, {}, 1000),
        manifest("quality", "documents", 10, 7, {"too_short": 3}, 700, ["ingest"]),
        manifest("train", "rows", 500, 3, {}, 0, ["quality"]),  # checkpoints, not documents
    ])
    assert [(r["stage"], r["outcome"], r["reason"], r["docs"], r["chars"], r["chars_in"]) for r in rows] == [
        ("ingest", "kept", "", 10, 1000, 1000),
        ("quality", "rejected", "too_short", 3, 30, 1000),
        ("quality", "kept", "", 7, 700, 1000),
    ]
    assert "| quality | rejected | too_short | 3 | 30.00% | 30 | 3.00% |" in to_markdown(rows)


def test_text_sets_name_the_bad_line(tmp_path):
    """JSONL text sets (evaluate) fail on the first bad line, naming file and line."""
    from stages.scoring.perplexity import read_text_set

    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=rf"^{path}:3: needs a string field 'text'"):
        read_text_set(str(path), None, "text", None, "all")
    path.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match=rf"^{path}:2: invalid JSON"):
        read_text_set(str(path), None, "text", None, "all")
    path.write_text('{"text": "a", "d": "x"}\n{"text": "b"}\n')
    assert read_text_set(str(path), None, "text", "d", "all")[:2] == (["a", "b"], ["x", "all"])
