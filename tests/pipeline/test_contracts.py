"""What crosses a boundary is a typed contract (pipeline/contracts.py): a stage's own content
lives under its summary and cannot replace the runner's keys, a summary kind names one class, a
part result of the wrong shape fails at once with the field, and a manifest reads back as written."""

from __future__ import annotations

import importlib
import json
import pkgutil
import typing
from typing import Any, ClassVar

import pyarrow as pa
import pytest
from pydantic import BaseModel

from pipeline import manifest as mf
from pipeline.config import load_config
from pipeline.contracts import Manifest, PartResult, PartResultInvalid, StageSummary, SummaryRecord, UnknownSummaryKind
from pipeline.registry import register
from pipeline.runner import Runner
from pipeline.stage import DatasetStage
from pipeline.storage import Storage


class ClaimsCoreKeys(StageSummary):
    """A summary whose fields carry the names of the manifest's own keys."""

    kind = "test_claims_core_keys"

    counts: dict[str, int]
    datasets: dict[str, int]
    format: int


@register
class _WritesThreeRows(DatasetStage):
    name: ClassVar[str] = "test_writes_three_rows"
    num_inputs = (0, 0)
    measure_column = None
    Summary = ClaimsCoreKeys

    def run(self, ctx) -> None:
        out = ctx.part_outputs("only", measure_column=None)
        out.write("data", pa.table({"n": [1, 2, 3]}))
        ctx.add_part_result(out.close(rows_in=3))
        ctx.set_summary(ClaimsCoreKeys(counts={"rows_in": -1, "kept": -1}, datasets={"data": 0}, format=99))


@register
class _AddsABadPartResult(DatasetStage):
    name: ClassVar[str] = "test_adds_a_bad_part_result"
    num_inputs = (0, 0)

    def run(self, ctx) -> None:
        ctx.add_part_result({"part": "00003", "files": {}, "rows": {"data": "3"}})


def _pipeline(pipeline_file, tmp_path, uses: str):
    return load_config(pipeline_file(f"""
name: contracts
work_dir: {tmp_path / "work"}
stages:
  probe:
    uses: {uses}
"""))


def test_a_summary_cannot_overwrite_the_manifests_own_keys(pipeline_file, tmp_path):
    report = Runner(_pipeline(pipeline_file, tmp_path, "test_writes_three_rows"), use_ray=False, track=False).run()
    stage = report.stage("probe")
    manifest = stage.manifest
    assert manifest["counts"]["rows_in"] == manifest["counts"]["kept"] == 3
    assert manifest["format"] == mf.MANIFEST_FORMAT and manifest["datasets"]["data"]["rows"] == 3
    assert manifest["summary"] == {"kind": "test_claims_core_keys",
                                   "data": {"counts": {"rows_in": -1, "kept": -1}, "datasets": {"data": 0}, "format": 99}}
    # the keys are the contract's, no more: nothing of a stage's is spread among them
    assert set(manifest) == {f.alias or name for name, f in Manifest.model_fields.items()}
    # and it reads back as it was written
    assert mf.load_manifest(Storage(), stage.stage_dir) == manifest
    on_disk = json.loads((tmp_path / "work" / "probe" / stage.fingerprint / mf.MANIFEST).read_text())
    assert mf.parse_manifest(on_disk, "x") == manifest


def test_a_manifest_with_a_key_of_its_own_or_a_wrong_type_is_refused_by_name(pipeline_file, tmp_path):
    manifest = Runner(_pipeline(pipeline_file, tmp_path, "test_writes_three_rows"), use_ray=False, track=False).run().stage("probe").manifest
    with pytest.raises(mf.ManifestInvalid, match=r"^where/_manifest.json: not a valid stage manifest: surprise: Extra inputs are not permitted"):
        mf.parse_manifest({**manifest, "surprise": {"counts": 1}}, "where/_manifest.json")
    with pytest.raises(mf.ManifestInvalid, match=r"counts\.kept: Input should be a valid integer"):
        mf.parse_manifest({**manifest, "counts": {**manifest["counts"], "kept": "3"}}, "where")
    # a manifest committed while dedup and decontaminate spread their report among the core keys still reads
    assert mf.parse_manifest({**manifest, "dedup": {"removed": 1}}, "old") == manifest


def test_an_unknown_summary_kind_is_refused_by_name():
    record = SummaryRecord.model_validate({"kind": "no_such_kind", "data": {}})
    with pytest.raises(UnknownSummaryKind, match=r"unknown summary kind 'no_such_kind' \(known: .*test_claims_core_keys"):
        record.read()
    with pytest.raises(UnknownSummaryKind, match="a 'no_such_kind' summary is not a 'test_claims_core_keys' summary"):
        record.read(ClaimsCoreKeys)
    read = SummaryRecord.of(ClaimsCoreKeys(counts={}, datasets={}, format=1)).read()
    assert isinstance(read, ClaimsCoreKeys) and read.format == 1


def test_a_summary_kind_names_one_class():
    with pytest.raises(TypeError, match=r"summary kind 'test_claims_core_keys' is declared twice: .*ClaimsCoreKeys and .*Impostor"):
        class Impostor(StageSummary):
            kind = "test_claims_core_keys"
    with pytest.raises(TypeError, match=r"kind '' must be a snake_case name"):
        class Nameless(StageSummary):
            pass


def test_a_part_result_of_the_wrong_shape_fails_naming_the_stage_part_and_field(pipeline_file, tmp_path):
    runner = Runner(_pipeline(pipeline_file, tmp_path, "test_adds_a_bad_part_result"), use_ray=False, track=False)
    with pytest.raises(PartResultInvalid, match=r"^stage 'probe': the result of part 00003 is not a PartResult: rows\.data: Input should be a valid integer \(got '3'\)$"):
        runner.run()
    # as a worker's JSON arrives on the driver
    with pytest.raises(PartResultInvalid, match=r"files\.data\.0\.rows: Input should be a valid integer"):
        PartResult.checked('{"part": "00001", "files": {"data": [{"path": "a", "rows": 1.5, "bytes": 3}]}}', "quality_filter")
    with pytest.raises(PartResultInvalid, match="rowz: Extra inputs are not permitted"):
        PartResult.checked({"part": "00001", "rowz": {}}, "quality_filter")


def _loose_fields(model: type[BaseModel], path: str) -> list[str]:
    """The fields of ``model`` (and of the models it holds) typed ``Any`` at any depth."""
    loose = []
    for name, field in model.model_fields.items():
        stack = [field.annotation]
        while stack:
            t = stack.pop()
            if t is Any:
                loose.append(f"{path}.{name}")
            elif isinstance(t, type) and issubclass(t, BaseModel):
                loose += _loose_fields(t, f"{path}.{name}")
            else:
                stack.extend(typing.get_args(t))
    return loose


def test_every_stage_summary_is_typed_to_the_leaves():
    import stages.summaries

    for info in pkgutil.iter_modules(stages.summaries.__path__):
        importlib.import_module(f"stages.summaries.{info.name}")
    summaries = [cls for cls in StageSummary.__subclasses__() if cls.__module__.startswith("stages.summaries.")]
    assert {cls.kind for cls in summaries} >= {"dedup", "decontaminate", "evaluate", "tokenize", "tokenizer", "train"}
    assert [f for cls in summaries for f in _loose_fields(cls, cls.__name__)] == []
