"""lm-eval task files without a model: what is refused (by name, with file and line), what is
quarantined per document, and the prompts (few-shot sampling as lm-eval's seeded sampler draws)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline import storage as st
from stages.evaluate.lmeval_metrics import apply_filter, exact_match, generation_metrics, token_f1
from stages.evaluate.lmeval_tasks import MetricSpec, TaskFileError, build_doc_requests, load_docs, load_task_file

BASE = """task: t
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
"""


def docs(n: int = 5) -> list[dict]:
    return [{"q": f"Question {i}?", "choices": [f"a{i}", f"b{i}", f"c{i}"], "gold": i % 3} for i in range(n)]


def write(tmp_path: Path, body: str, records=None, name: str = "t.yaml") -> str:
    (tmp_path / "docs.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in (records if records is not None else docs())))
    (tmp_path / name).write_text(body)
    return str(tmp_path / name)


@pytest.mark.parametrize("extra,key,words", [
    ("process_docs: !function utils.process_docs\n", "process_docs", "runs no task code"),
    ("process_results: !function utils.process_results\n", "process_results", "runs no task code"),
    ("use_prompt: promptsource:GPT-3 style\n", "use_prompt", "promptsource"),
    ("doc_to_image: image\n", "doc_to_image", "multimodal"),
    ("shuffle_choices: true\n", "shuffle_choices", "unknown key"),
    ("repeats: 4\n", "repeats", "greedy"),
    ("metric_list:\n  - metric: bleu\n", "metric_list[0]", "not supported"),
    ("metric_list:\n  - metric: acc\n    aggregation: median\n", "metric_list[0].aggregation", "aggregates by mean"),
    ("filter_list:\n  - name: x\n    filter:\n      - function: take_first\n", "filter_list", "generated answers"),
    ("fewshot_config:\n  sampler: balanced\n", "fewshot_config.sampler", "default and first_n"),
])
def test_unsupported_features_are_refused_by_name_with_file_and_line(tmp_path, extra, key, words):
    path = write(tmp_path, BASE + extra)
    with pytest.raises(TaskFileError) as e:
        load_task_file(path)
    msg = str(e.value)
    line = BASE.count("\n") + 1
    assert msg.startswith(f"{path}:{line}: {key}:") and words in msg and "\n" not in msg, msg


def test_a_function_inside_a_template_key_is_refused(tmp_path):
    path = write(tmp_path, BASE.replace('doc_to_text: "{{q}}"', "doc_to_text: !function utils.doc_to_text"))
    with pytest.raises(TaskFileError, match=r"t.yaml:8: doc_to_text: !function utils.doc_to_text is Python code"):
        load_task_file(path)


def test_hub_datasets_and_groups_are_refused(tmp_path):
    with pytest.raises(TaskFileError, match=r"dataset_path: 'allenai/ai2_arc' would be read from a hub"):
        load_task_file(write(tmp_path, BASE.replace("dataset_path: json", "dataset_path: allenai/ai2_arc")))
    with pytest.raises(TaskFileError, match=r"group: a group of tasks"):
        load_task_file(write(tmp_path, "group: g\ntask: [a, b]\n"))
    with pytest.raises(TaskFileError, match=r"fewshot_split: split 'train' has no data_files"):
        load_task_file(write(tmp_path, BASE + "fewshot_split: train\n"))


def test_an_empty_data_file_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, BASE, records=[])
    task = load_task_file(path)
    with pytest.raises(TaskFileError, match=r"data file .*docs.jsonl \(split 'test'\) is empty"):
        load_docs(task, st.Storage())


def test_bad_documents_are_quarantined_with_their_line_and_reason(tmp_path):
    records = docs(6)
    records[1] = {"q": "no choices here", "choices": [], "gold": 0}
    records[2]["gold"] = 7
    records[3] = "{not json"
    records[4]["hints"] = []  # the template reads hints[0]: undefined (StrictUndefined) on this document only
    path = write(tmp_path, BASE.replace('doc_to_text: "{{q}}"', 'doc_to_text: "{{q ~ hints[0]}}"'), [
        {**r, "hints": r.get("hints", [""])} if isinstance(r, dict) else r for r in records])
    task = load_task_file(path)
    loaded = load_docs(task, st.Storage())
    requests, bad = build_doc_requests(task, loaded, 0)
    reasons = {b.where.rsplit(":", 1)[1]: b.reason for b in loaded.bad + bad}
    assert reasons == {"2": "empty_choices", "3": "gold_out_of_range", "4": "invalid_json", "5": "template_error"}
    assert [r.where.rsplit(":", 1)[1] for r in requests] == ["1", "6"]
    assert len(requests) + len(bad) + len(loaded.bad) == len(records)  # counts add up
    assert all(b.message.startswith(b.where) for b in loaded.bad + bad)


def test_include_merges_and_relative_data_files(tmp_path):
    (tmp_path / "_template_yaml").write_text(BASE.replace("task: t\n", "") + 'description: "Answer.\\n\\n"\n')
    path = write(tmp_path, "include: _template_yaml\ntask: child\ndoc_to_text: 'Q: {{q}}'\n")
    task = load_task_file(path)
    assert task.name == "child" and task.doc_to_text == "Q: {{q}}" and task.output_type == "multiple_choice"
    assert task.data_files == {"test": (str(tmp_path / "docs.jsonl"),)}
    requests, _ = build_doc_requests(task, load_docs(task, st.Storage()), 0)
    assert requests[0].pairs[0] == ("Answer.\n\nQ: Question 0?", " a0")


@pytest.mark.parametrize("fewshot_split", [None, "test"])
def test_fewshot_draws_follow_lm_evals_seeded_sampler(tmp_path, fewshot_split):
    """The default sampler: one random.Random(seed) drawn from in document order. When the shots
    come from the evaluated split named as the few-shot split, lm-eval draws n + 1 and removes the
    document itself; with no few-shot split it draws n from the same documents, itself included."""
    body = BASE + "num_fewshot: 2\n" + (f"fewshot_split: {fewshot_split}\n" if fewshot_split else "")
    path = write(tmp_path, body, docs(8))
    task = load_task_file(path)
    loaded = load_docs(task, st.Storage())
    requests, _ = build_doc_requests(task, loaded, 2, seed=1234)
    rnd, pool = random.Random(1234), loaded.splits["test"]
    for doc, req in zip(pool, requests):
        shots = [x for x in rnd.sample(pool, 3) if x != doc][:2] if fewshot_split else rnd.sample(pool, 2)
        expected = "".join(f"{s['q']} {s['choices'][s['gold']]}\n\n" for s in shots) + doc["q"]
        assert req.pairs[0][0] == expected
    other, _ = build_doc_requests(task, loaded, 2, seed=7)
    assert [r.pairs for r in other] != [r.pairs for r in requests]


def test_generation_metrics_and_filters_as_lm_eval_computes_them():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    pairs = [("The Answer.", "the answer"), (" 42 ", "42"), ("Paris, France", "Paris France"), ("x", "x")]
    for kwargs in ({}, {"ignore_case": True, "ignore_punctuation": True}, {"regexes_to_ignore": [" ", ","]}, {"ignore_numbers": True}):
        for pred, ref in pairs:
            assert exact_match(pred, ref, **kwargs) == exact_match_hf_evaluate([pred], [ref], **kwargs)["exact_match"]
    for text in ("so #### 1,234 done", "no number", "#### -3.5 and #### 7"):
        for pattern, group in ((r"#### (\-?[0-9\.\,]+)", 0), (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)):
            theirs = RegexFilter(pattern, group, "[invalid]").apply([[text]], [{}])[0][0]
            assert apply_filter((("regex", {"regex_pattern": pattern, "group_select": group}), ("take_first", {})), [text]) == theirs
    assert token_f1("the Eiffel Tower", "Eiffel tower in Paris") == pytest.approx(2 * (2 / 2) * (2 / 4) / (2 / 2 + 2 / 4))
    assert generation_metrics("Paris", ["London", "paris"], (MetricSpec("exact_match", {"ignore_case": True}), MetricSpec("token_f1")))\
        == {"exact_match": 1.0, "token_f1": 1.0}


def test_generative_scores_make_the_table_with_their_filter():
    from stages.evaluate import report

    rows = [{"checkpoint": "c1", "step": 10, "tokens_seen": 1000, "task": "gsm_5shot", "metric": m, "value": v, "stderr": 0.1, "n": 10}
            for m, v in (("exact_match/strict-match", 0.2), ("exact_match/flexible-extract", 0.3), ("token_f1", 0.45))]
    lines = report.markdown_table(rows).splitlines()
    assert lines[2:] == ["| gsm_5shot | exact_match/flexible-extract (%) | 30.00 ± 10.00 |",
                         "| gsm_5shot | exact_match/strict-match (%) | 20.00 ± 10.00 |",
                         "| gsm_5shot | token_f1 (%) | 45.00 ± 10.00 |"]


GENERATE = """task: g
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{q}}"
doc_to_target: "{{a}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""


def test_an_empty_prompt_to_generate_from_is_quarantined_and_the_rest_is_scored(tmp_path, tmp_path_factory):
    """A generation document whose prompt renders empty used to fail its whole evaluation job
    ("the prompt encodes to no tokens"); it is quarantined with its line, and the job scores the rest."""
    from stages.evaluate.lmeval_run import LmEvalJob
    from stages.evaluate.worker import EvalJob, run_job
    from tests.stages.test_evaluate_support import tiny_run

    records = [{"q": f"Question {i}: what is {i} plus one?", "a": str(i + 1)} for i in range(4)]
    records[2]["q"] = ""
    task = load_task_file(write(tmp_path, GENERATE, records))
    loaded = load_docs(task, st.Storage())
    requests, bad = build_doc_requests(task, loaded, 0)
    assert [(b.where.rsplit(":", 1)[1], b.reason) for b in bad] == [("3", "empty_prompt")]
    assert bad[0].message.startswith(bad[0].where) and "empty" in bad[0].message
    assert len(requests) + len(bad) + len(loaded.bad) == len(records)  # counts add up

    run = tiny_run(tmp_path_factory.getbasetemp() / "eval-tiny-run")  # shared with the other evaluate tests
    job = LmEvalJob("g_0shot", task.name, task.output_type, tuple(requests), task.metrics, task.filters, task.until, task.max_gen_toks)
    res = run_job(EvalJob(checkpoint=run["checkpoints"][-1], tokenizer_json=Path(run["tokenizer"]).read_text(), prefix_token=0,
                          eos_token=1, lmeval=(job,)))["lmeval"]["g_0shot"]
    assert [s["where"].rsplit(":", 1)[1] for s in res["samples"]] == ["1", "2", "4"]
    assert res["metrics"]["exact_match"]["n"] == 3
