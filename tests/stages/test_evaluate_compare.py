"""The ablation comparison over hand-made evaluation rows: the last checkpoint of each variant,
its difference to the base (mean over the base's seeds), the seed noise and whether the
difference exceeds it; Markdown, CSV and the bits-per-byte plot."""

from __future__ import annotations

import csv
import io
import re

import pytest

from stages.evaluate.compare import bpb_curves, bpb_png, compare, csv_text, last_checkpoint, markdown


def rows(acc: float, bpb_by_tokens: dict[int, float], stderr: float = 0.01) -> list[dict]:
    out = []
    for i, (tokens, bpb) in enumerate(sorted(bpb_by_tokens.items())):
        base = {"checkpoint": f"ckpt/{i}", "step": 10 * (i + 1), "tokens_seen": tokens}
        # accuracy at earlier checkpoints is worse: only the last one may count
        out.append({**base, "task": "mmlu", "metric": "acc", "value": acc - 0.1 * (len(bpb_by_tokens) - 1 - i), "stderr": stderr, "n": 100})
        out.append({**base, "task": "validation/_all", "metric": "bits_per_byte", "value": bpb, "stderr": None, "n": 5000})
        out.append({**base, "task": "validation/news", "metric": "bits_per_byte", "value": bpb + 0.5, "stderr": None, "n": 3000})
        out.append({**base, "task": "validation/news", "metric": "perplexity", "value": 40.0, "stderr": None, "n": 3000})
    return out


RESULTS = {
    "base": rows(0.30, {1000: 3.0, 2000: 2.50}),
    "base.seed1": rows(0.32, {1000: 3.1, 2000: 2.52}),
    "base.seed2": rows(0.31, {1000: 2.9, 2000: 2.48}),
    "better_data": rows(0.40, {1000: 2.8, 2000: 2.30}),
    "same_ish": rows(0.305, {1000: 3.0, 2000: 2.51}),
}
BASE_RUNS = ["base", "base.seed1", "base.seed2"]


def by(rows_, variant, task, metric):
    return next(r for r in rows_ if (r.variant, r.task, r.metric) == (variant, task, metric))


def test_last_checkpoint_is_the_one_with_most_tokens():
    assert {r["tokens_seen"] for r in last_checkpoint(RESULTS["base"])} == {2000}
    assert last_checkpoint([]) == []


def test_differences_are_measured_against_the_base_mean_and_its_seed_noise():
    out = compare(RESULTS, BASE_RUNS)
    acc = by(out, "better_data", "mmlu", "acc")
    assert acc.value == pytest.approx(0.40) and acc.stderr == 0.01 and acc.tokens_seen == 2000
    assert acc.diff_to_base == pytest.approx(0.40 - 0.31)
    assert acc.seed_std == pytest.approx(0.01) and acc.seeds == 3
    assert acc.beyond_noise is True
    small = by(out, "same_ish", "mmlu", "acc")
    assert small.diff_to_base == pytest.approx(-0.005) and small.beyond_noise is False
    # bits per byte: overall and per domain, no per-example stderr; lower is better, the sign says so
    bpb = by(out, "better_data", "validation/_all", "bits_per_byte")
    assert bpb.diff_to_base == pytest.approx(-0.2) and bpb.seed_std == pytest.approx(0.02) and bpb.beyond_noise is True
    assert by(out, "same_ish", "validation/news", "bits_per_byte").beyond_noise is False
    assert by(out, "base.seed1", "mmlu", "acc").beyond_noise is None  # the base's own runs define the noise
    assert not [r for r in out if r.metric == "perplexity"]  # only the table's metrics
    # one base run: no noise to compare with, said as such rather than guessed
    alone = compare({"base": RESULTS["base"], "better_data": RESULTS["better_data"]}, ["base"])
    assert by(alone, "better_data", "mmlu", "acc").seed_std is None and by(alone, "better_data", "mmlu", "acc").beyond_noise is None


def test_markdown_and_csv():
    out = compare(RESULTS, BASE_RUNS)
    md = markdown(out)
    assert "| mmlu | acc (%) | better_data | 40.00 ± 1.00 | +9.00 | 1.00 (n=3) | yes | 2K |" in md
    assert "| validation/_all | bits_per_byte | better_data | 2.3000 | -0.2000 | 0.0200 (n=3) | yes | 2K |" in md
    assert md.index("| mmlu |") < md.index("| validation/_all |")  # accuracy first, then bits per byte
    parsed = list(csv.DictReader(io.StringIO(csv_text(out))))
    assert len(parsed) == len(out) == 5 * 3
    row = next(r for r in parsed if r["variant"] == "same_ish" and r["metric"] == "acc")
    assert float(row["diff_to_base"]) == pytest.approx(-0.005) and row["beyond_noise"] == "False"


def test_bpb_curves_and_plot_per_variant():
    curves = bpb_curves(RESULTS)
    assert curves["better_data"] == [(1000, 2.8), (2000, 2.3)] and set(curves) == set(RESULTS)
    png = bpb_png(RESULTS, "ablation")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == bpb_png(RESULTS, "ablation")
    assert bpb_png({"base": [r for r in RESULTS["base"] if r["metric"] == "acc"]}, "x") is None


def test_compare_cli_reads_each_variants_evaluation_and_logs_to_the_ablation_run(ray_local, tmp_path, capsys):
    """End to end on the evaluate test's fixture stages (a tiny model trained in-process): a
    variant that evaluates 0-shot only, the base repeated with another seed."""
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.config import load_config
    from tests.stages.test_evaluate_pipeline import PIPELINE  # registers the fixture stages
    from tests.stages.test_evaluate_support import mmlu_like_records, tiny_run, write_task

    run_dir = tmp_path / "run"
    tiny_run(run_dir)
    task = write_task(tmp_path / "qa.jsonl", mmlu_like_records(12))
    docs = write_task(tmp_path / "docs.jsonl", [{"text": r["context"], "kind": "q"} for r in mmlu_like_records(6)])
    body = PIPELINE.format(work=tmp_path / "work", run=run_dir, task=task, docs=docs)
    body += f"""variants:
  base: {{seeds: [5]}}
  zero_shot:
    stages: {{evaluate: {{config: {{tasks: [{{name: qa, path: "{task}", shots: [0]}}]}}}}}}
"""
    path = tmp_path / "pipeline.yaml"
    path.write_text(body)
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    assert main(["compare", str(path)]) == 0
    captured = capsys.readouterr()
    md = captured.out
    for variant in ("base", "base.seed5", "zero_shot"):
        assert f"| qa_0shot | acc (%) | {variant} |" in md
    assert "| qa_1shot | acc (%) | zero_shot |" not in md and "| qa_1shot | acc (%) | base |" in md
    # the seed repeat shares the base's outputs (no stage here draws from the seed): no noise, nothing beyond it
    assert "| qa_0shot | acc (%) | zero_shot | 8.33 ± 8.33 | +0.00 | 0.00 (n=2) | no | 15.4K |" in md
    assert "| validation/_all | bits_per_byte | zero_shot |" in md
    # bits per byte on the gold answers, with its standard error over the task's questions
    assert re.search(r"\| qa_0shot \| gold_bits_per_byte \| zero_shot \| \d+\.\d{4} ± \d+\.\d{4} \| [+-]\d+\.\d{4} \|", md), md
    assert main(["compare", str(path), "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("variant,task,metric,value,stderr,diff_to_base")
    loaded = load_config(str(path))
    client = MlflowClient(loaded.resolved.tracking_uri())
    exp = client.get_experiment_by_name("lmpipe").experiment_id
    (ablation,) = client.search_runs([exp], "tags.`lmpipe.kind` = 'ablation'")
    logged = {a.path for a in client.list_artifacts(ablation.info.run_id, "comparison")}
    assert logged == {"comparison/comparison.md", "comparison/comparison.csv", "comparison/validation_bpb.png"}
    assert ablation.data.tags["lmpipe.variants"] == "base,base.seed5,zero_shot"


def test_bits_per_byte_on_the_gold_answers_is_compared_with_its_standard_error():
    """DataDecide's continuous metric, recorded per task by the evaluate stage, is in the comparison
    with its standard error over the task's examples, beside accuracy."""
    def with_gold(rows_, gold_bpb):
        last = max(r["tokens_seen"] for r in rows_)
        extra = {"checkpoint": "ckpt/last", "step": 20, "tokens_seen": last, "task": "mmlu", "metric": "gold_bits_per_byte",
                 "value": gold_bpb, "stderr": 0.03, "n": 100}
        return [{**r, "checkpoint": "ckpt/last"} if r["tokens_seen"] == last else r for r in rows_] + [extra]

    results = {"base": with_gold(RESULTS["base"], 1.50), "base.seed1": with_gold(RESULTS["base.seed1"], 1.52),
               "better_data": with_gold(RESULTS["better_data"], 1.20)}
    out = compare(results, ["base", "base.seed1"])
    gold = by(out, "better_data", "mmlu", "gold_bits_per_byte")
    assert gold.value == pytest.approx(1.20) and gold.stderr == pytest.approx(0.03)
    assert gold.diff_to_base == pytest.approx(-0.31) and gold.beyond_noise is True
    md = markdown(out)
    assert "| mmlu | gold_bits_per_byte | better_data | 1.2000 ± 0.0300 | -0.3100 |" in md
