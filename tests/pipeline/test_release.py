"""``lmpipe release``: a bundle rendered from a committed run's records (cards, export, pipeline
file, code version, training logs from MLflow, ablation comparison) with the sha256 of every file;
the same runs give the same bytes, a tampered bundle fails naming the file, and a run that is not
committed is refused in one line.

The run: real data stages on real text (Python's documentation topics and MMLU questions:
ingest -> exact_dedup -> decontaminate -> train_tokenizer -> tokenize), a train stage and the
real evaluate stage, with one variant that changes only the evaluation. The train stage is a
stand-in for ``train`` without Ray Train (~25 s saved): the same Trainer on the tokenize stage's
shards, logging every step to the stage's MLflow run as the real stage's ranks do, the same
checkpoint export and the same TrainSummary."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest
import yaml

from pipeline import storage as st
from pipeline.config import StrictModel
from pipeline.registry import register
from pipeline.stage import DatasetStage
from stages.summaries.tokenize import TokenizeSummary
from stages.summaries.train import TrainSummary
from tests.conftest import make_bucket, s3_filesystem
from tests.stages.test_evaluate_support import mmlu_like_records, write_task


class InProcessTrainConfig(StrictModel):
    steps: int = 20
    checkpoint_every: int = 10


@register
class ReleaseFixtureTrain(DatasetStage):
    name: ClassVar[str] = "release_fixture_train"
    Config = InProcessTrainConfig
    measure_column = None
    Summary = TrainSummary

    def run(self, ctx) -> None:
        import torch

        from stages.model.transformer import model_config
        from stages.tokenize.loader import TokenShardLoader
        from stages.train.config import TrainConfig
        from stages.train.export import export_checkpoint
        from stages.train.trainer import LocalCheckpointer, Trainer

        src = ctx.inputs[0]
        info = src.summary(TokenizeSummary)
        model = model_config("debug", vocab_size=info.vocab_size, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=info.seq_len)
        cfg = TrainConfig(loop={"steps": self.config.steps, "micro_batch_size": 4, "log_every": 2, "eval_every": 0, "norms_every": 0},
                          optimizer={"lr": 3e-3}, schedule={"warmup_steps": 2}, checkpoint={"every": self.config.checkpoint_every})
        torch.manual_seed(0)
        root = st.join(ctx.attempt_uri, "ckpt")
        trainer = Trainer(cfg, model, TokenShardLoader(src.files(), 4, seed=0), info.seq_len, checkpointer=LocalCheckpointer(root),
                          sink=ctx.run_logger, seed=0)
        trainer.train()
        checkpoints = sorted(str(p) for p in Path(root).iterdir())
        export = st.join(ctx.attempt_uri, "hf")
        export_checkpoint(checkpoints[-1], export, src.path(info.tokenizer_path), {"bos_id": info.bos_id, "eos_id": info.eos_id,
                                                                                    "pad_id": info.pad_id})
        steps = [int(Path(p).name.split("_")[1]) for p in checkpoints]
        rows = [{"step": s, "tokens_seen": s * trainer.tokens_per_step, "path": p, "final": p == checkpoints[-1]}
                for s, p in zip(steps, checkpoints)]
        out = ctx.part_outputs("checkpoints", measure_column=None)
        out.write("data", pa.Table.from_pylist(rows))
        ctx.add_part_result(out.close(rows_in=src.num_rows))
        ctx.set_summary(TrainSummary(hf_export=export, final_checkpoint=checkpoints[-1], steps=steps[-1], tokens_seen=rows[-1]["tokens_seen"],
                                     model=model.to_dict(), num_params=model.num_params(), tokenizer="tokenizer.json"))


PIPELINE = """
name: release-test
work_dir: {work}
seed: 3
mlflow: {{tracking_uri: "sqlite:///{work}/mlflow.db"}}
storage: {{s3: {{endpoint_url: "{endpoint}"}}}}
release:
  license: apache-2.0
  sources:
    docs: {{license: PSF-2.0, homepage: "https://docs.python.org"}}
stages:
  ingest:
    uses: ingest
    config:
      sources:
        - {{name: docs, paths: ["{docs}"]}}
        - {{name: questions, paths: ["{questions}"]}}
  exact_dedup:
    uses: exact_dedup
    inputs: [ingest]
  decontaminate:
    uses: decontaminate
    inputs: [exact_dedup]
    config: {{tasks: [mmlu]}}
  train_tokenizer:
    uses: train_tokenizer
    inputs: [decontaminate]
    config: {{vocab_size: 512, sample_chars: 300000}}
  tokenize:
    uses: tokenize
    inputs: [decontaminate, train_tokenizer]
    config: {{seq_len: 32, validation_fraction: 0.1, mixture: {{docs: 0.8, questions: 0.2}}, max_copies: 4}}
  train:
    uses: release_fixture_train
    inputs: [tokenize.train]
  evaluate:
    uses: evaluate
    inputs: [train]
    config:
      checkpoints: all
      tasks: [{{name: qa, path: "{task}", shots: [0]}}]
      validation_max_sequences: 8
      batch_tokens: 1024
variants:
  qa_half:
    stages: {{evaluate: {{config: {{tasks: [{{name: qa, path: "{task}", shots: [0], limit: 6}}]}}}}}}
"""


def write_sources(root: Path) -> tuple[str, str]:
    """Real English: Python's documentation topics (three of them twice: exact duplicates) and
    MMLU questions, whose text the decontaminate stage finds in its MMLU index."""
    from pydoc_data.topics import topics

    names = sorted(topics)[:40]
    docs = [{"text": topics[n], "url": f"https://docs.python.org/topics/{n}"} for n in names if len(topics[n]) > 200]
    docs += [dict(d, url=d["url"] + "?copy") for d in docs[:3]]
    questions = [{"text": r["context"] + " " + " ".join(r["choices"])} for r in mmlu_like_records(30, offset=7)]
    questions += [{"text": f"A note of {i} words on arithmetic: two and two make four, and four and four make eight."} for i in range(20)]
    return write_task(root / "docs.jsonl", docs), write_task(root / "questions.jsonl", questions)


@pytest.fixture(scope="module")
def release_run(ray_local, s3_server, tmp_path_factory):
    """The pipeline and its variant, committed once for the module (MLflow in the work dir)."""
    from pipeline.cli import main

    root = tmp_path_factory.mktemp("release-run")
    docs, questions = write_sources(root)
    task = write_task(root / "qa.jsonl", mmlu_like_records(12))
    path = root / "pipeline.yaml"
    path.write_text(PIPELINE.format(work=root / "work", endpoint=s3_server["endpoint_url"], docs=docs, questions=questions, task=task))
    assert main(["run", str(path)]) == 0
    return {"path": str(path), "root": root}


def read_bundle(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_bundle_holds_what_the_records_say(release_run, tmp_path, capsys):
    from mlflow import MlflowClient

    from pipeline import manifest as mf
    from pipeline.cli import main
    from pipeline.config import load_config
    from pipeline.evaluations import compare_variants, evaluate_rows
    from pipeline.funnel import funnel_rows
    from pipeline.runner import Runner

    out = tmp_path / "bundle"
    assert main(["release", release_run["path"], "--out", str(out)]) == 0
    files = read_bundle(out)
    loaded = load_config(release_run["path"])
    runner = Runner(loaded, use_ray=False, track=False)
    dirs = {n: mf.stage_uri(runner.work_dir, n, f.value) for n, f in runner.fingerprints().items()}
    manifests = {n: mf.read_manifest(runner.storage, d) for n, d in dirs.items()}
    summary = {n: (m["summary"] or {}).get("data") for n, m in manifests.items()}

    # the Hugging Face model folder: the export's files as they are, and a card whose metadata
    # and model-index are the final checkpoint's scores in the evaluate output
    export = Path(summary["train"]["hf_export"])
    exported = {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}
    assert any(name.endswith(".safetensors") for name in exported) and "config.json" in exported
    for name in exported:
        assert files[f"model/{name}"] == (export / name).read_bytes()
    card = files["model/README.md"].decode()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["docs", "questions"] and "base_model" not in meta
    rows = evaluate_rows(runner.storage, dirs["evaluate"])
    final = [r for r in rows if r["checkpoint"] == summary["train"]["final_checkpoint"]]
    assert final and len({r["checkpoint"] for r in rows}) == 2
    indexed = {(res["dataset"]["name"], m["type"]): m["value"] for res in meta["model-index"][0]["results"] for m in res["metrics"]}
    assert indexed == {(r["task"], r["metric"]): r["value"] for r in final}
    assert ("qa_0shot", "acc") in indexed

    # the data card: removals per stage and reason, dedup, contamination, tokens -- the records' numbers
    data_card = files["data_card.md"].decode()
    assert "| docs | PSF-2.0 |" in data_card and "| questions | unspecified" in data_card
    removed = [r for r in funnel_rows(list(manifests.values())) if r["outcome"] != "kept"]
    assert {r["stage"] for r in removed} >= {"exact_dedup", "decontaminate"}
    for r in removed:
        assert f"| {r['stage']} | {r['outcome']} | {r['reason']} | {r['docs']:,} |" in data_card
    dedup = summary["exact_dedup"]
    assert dedup["removed"] == 3 and f"| docs | {dedup['documents_per_source']['docs']:,} | 3 |" in data_card
    mmlu = summary["decontaminate"]["tasks"]["mmlu"]
    assert mmlu["docs"] > 0 and f"| mmlu | {mmlu['examples']:,} | {mmlu['examples_found']:,} |" in data_card
    tokens = summary["tokenize"]
    for src in ("docs", "questions"):
        assert (f"| train | {src} | {tokens['documents']['train'][src]:,} | {tokens['tokens_encoded']['train'][src]:,}"
                f" | {tokens['tokens']['train'][src]:,} |") in data_card
    assert "| docs | 0.8 |" in data_card  # the mixture's configured weight
    dataset_card = files["dataset/README.md"].decode()
    assert front_matter(dataset_card)["license"] == "other"  # one source licensed, one not

    # the training logs: every logged value of the run that trained it, as MLflow holds it
    client = MlflowClient(loaded.resolved.tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id],
                                f"tags.`lmpipe.fingerprint` = '{manifests['train']['fingerprint']}' and tags.`lmpipe.cached` = 'false'")
    logged = list(csv.DictReader(io.StringIO(files["training_logs/train.csv"].decode())))
    losses = [(int(r["step"]), float(r["value"])) for r in logged if r["metric"] == "loss"]
    assert losses == [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) >= 10  # every other step of 20

    # the pipeline file, the code that made each output, the ablation comparison
    assert files["pipeline/pipeline.yaml"] == Path(release_run["path"]).read_bytes()
    code = json.loads(files["code_version.json"])
    assert code["stages"]["tokenize"]["code_files"] == manifests["tokenize"]["code_files"]
    assert code["code_versions"] == sorted({m["code_version"] for m in manifests.values()})
    comparison = compare_variants(loaded, "evaluate", 2.0).comparison
    assert files["ablation/comparison.md"].decode() == comparison.markdown and "| qa_half |" in comparison.markdown
    assert files["ablation/validation_bpb.png"] == comparison.png
    assert json.loads(files["records/ingest.manifest.json"]) == manifests["ingest"]

    # SHA256SUMS lists every other file; the bundle verifies
    listed = dict(line.split("  ")[::-1] for line in files["SHA256SUMS"].decode().splitlines())
    assert set(listed) == set(files) - {"SHA256SUMS"}
    capsys.readouterr()
    assert main(["release", "--verify", str(out)]) == 0
    assert f"all {len(listed)} files match SHA256SUMS" in capsys.readouterr().out


def test_the_same_runs_give_the_same_bytes_and_a_tampered_bundle_fails_naming_the_file(release_run, tmp_path, capsys):
    from pipeline.cli import main

    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["release", release_run["path"], "--out", str(first)]) == 0
    assert main(["release", release_run["path"], "--out", str(second)]) == 0
    assert read_bundle(first) == read_bundle(second)
    assert main(["release", release_run["path"], "--out", str(first)]) == 1  # never written over
    assert "already holds files" in capsys.readouterr().err

    weights = next(p for p in sorted((second / "model").iterdir()) if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (second / "data_card.md").unlink()
    (second / "notes.txt").write_text("added after the release\n")
    assert main(["release", "--verify", str(second)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"model/{weights.name}: changed" in err and "data_card.md: missing" in err and "notes.txt: not listed in SHA256SUMS" in err
    assert main(["release", "--verify", str(first)]) == 0


def test_release_to_s3_matches_the_local_one_and_verifies_there(release_run, s3_env, tmp_path, capsys):
    """The endpoint comes from the pipeline file's storage options; credentials from the environment."""
    from pipeline.cli import main

    make_bucket(s3_env, "releases")
    local = tmp_path / "local"
    assert main(["release", release_run["path"], "--out", str(local)]) == 0
    assert main(["release", release_run["path"], "--out", "s3://releases/v1"]) == 0
    fs = s3_filesystem(s3_env)
    assert fs.cat("releases/v1/SHA256SUMS") == (local / "SHA256SUMS").read_bytes()
    assert fs.cat("releases/v1/model/README.md") == (local / "model" / "README.md").read_bytes()
    capsys.readouterr()
    assert main(["release", "--verify", "s3://releases/v1", release_run["path"]]) == 0
    fs.pipe("releases/v1/code_version.json", b"{}\n")
    assert main(["release", "--verify", "s3://releases/v1", release_run["path"]]) == 1
    assert "code_version.json: changed" in capsys.readouterr().err


def test_a_stage_not_committed_is_refused_in_one_line(release_run, tmp_path, capsys):
    """The file with another evaluation config: its evaluate output was never computed."""
    from pipeline.cli import main

    text = Path(release_run["path"]).read_text().replace("validation_max_sequences: 8", "validation_max_sequences: 7")
    path = Path(release_run["root"]) / "changed.yaml"
    path.write_text(text)
    capsys.readouterr()
    assert main(["release", str(path), "--out", str(tmp_path / "never")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not committed" in err and "evaluate (" in err and "train (" not in err
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob("never.tmp-*"))


def test_a_data_only_file_releases_its_data_and_an_unknown_source_is_refused(release_run, tmp_path, capsys):
    """The same data stages without a model: their outputs are the committed ones (same
    fingerprints), and the bundle holds the data and dataset cards but no model."""
    from pipeline.cli import main

    text = Path(release_run["path"]).read_text()
    data_only = text[: text.index("  train:\n    uses: release_fixture_train")]
    path = Path(release_run["root"]) / "data-only.yaml"
    path.write_text(data_only)
    out = tmp_path / "data"
    assert main(["release", str(path), "--out", str(out)]) == 0
    files = read_bundle(out)
    assert not [p for p in files if p.startswith(("model/", "training_logs/", "ablation/", "evaluation/"))]
    assert {"data_card.md", "dataset/README.md", "records/tokenize.manifest.json", "SHA256SUMS"} <= set(files)
    assert "## Tokens: `tokenize`" in files["data_card.md"].decode() and "release-test: training data" in files["dataset/README.md"].decode()
    path.write_text(data_only.replace("    docs: {license: PSF-2.0", "    doc: {license: PSF-2.0"))
    capsys.readouterr()
    assert main(["release", str(path), "--out", str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "release.sources.doc: no such source (sources: docs, questions)" in err
