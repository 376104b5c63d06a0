"""Scoring a model lmpipe did not train, beside one it did, as published comparisons do (OpenLM's
table puts Pythia and OPT next to OpenLM-1B): a pipeline with only an ``evaluate`` stage scores
Hugging Face folders given by path, each with its own tokenizer -- here a GPT-NeoX model (Pythia's
architecture, run by ``transformers``) and lmpipe's own export -- and the GPT-NeoX scores equal
lm-evaluation-harness's on the same folder, per question."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.io import read_table
from pipeline.runner import Runner
from pipeline.storage import Storage
from tests.stages.test_evaluate_support import mmlu_like_records, tiny_run, write_task

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

PLAIN_TASK = """task: lmpipe_plain_baseline
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def gpt_neox(folder: Path, tokenizer_file: str) -> str:
    """A small random GPT-NeoX (rotary on part of each head, parallel attention and MLP, LayerNorm
    with bias: nothing lmpipe's own model can load), saved as safetensors with a tokenizer."""
    import torch
    from tokenizers import Tokenizer

    from stages.train.export import write_tokenizer

    vocab = Tokenizer.from_file(tokenizer_file).get_vocab_size(with_added_tokens=True)
    config = transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=96, max_position_embeddings=128, rotary_pct=0.25,
                                        bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(tokenizer_file, str(folder), {"bos_id": 0, "eos_id": 1, "pad_id": 2}, 128)
    return str(folder)


def test_an_evaluate_only_pipeline_scores_foreign_and_own_models_like_lm_eval(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    run = tiny_run(tmp_path_factory.getbasetemp() / "eval-tiny-run")
    neox = gpt_neox(root / "pythia-like", run["tokenizer"])
    task = write_task(root / "qa.jsonl", mmlu_like_records(20))
    path = root / "p.yaml"
    path.write_text(f"""
name: baselines
work_dir: {root / "work"}
stages:
  evaluate:
    uses: evaluate
    config:
      paths: ["{neox}", "{run["hf"]}"]
      tasks: [{{name: qa, path: "{task}", shots: [0]}}]
      batch_tokens: 1024
""")
    report = Runner(load_config(str(path)), use_ray=False, track=False).run()
    stage = report.stage("evaluate")
    files = [str(Path(stage.stage_dir) / f["path"]) for f in stage.manifest["datasets"]["examples"]["files"]]
    examples = read_table(Storage(), files).to_pylist()
    assert {e["checkpoint"] for e in examples} == {neox, run["hf"]}
    ours = sorted((e for e in examples if e["checkpoint"] == neox), key=lambda e: e["id"])
    assert len(ours) == 20

    (root / "tasks").mkdir()
    (root / "tasks" / "plain.yaml").write_text(PLAIN_TASK.format(path=json.dumps(task)[1:-1]))
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={neox},dtype=float32", tasks=["lmpipe_plain_baseline"],
                                  num_fewshot=0, task_manager=TaskManager(include_path=str(root / "tasks")), batch_size=16,
                                  device="cpu", log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    samples = sorted(out["samples"]["lmpipe_plain_baseline"], key=lambda s: s["doc_id"])
    for mine, s in zip(ours, samples):
        theirs = [r[0] for r in s["filtered_resps"]]
        assert np.allclose(mine["lls"], theirs, rtol=0, atol=1e-4), (mine["id"], mine["lls"], theirs)
        assert mine["pred"] == int(np.argmax(theirs))
    rows = {(r["checkpoint"], r["metric"]): r for r in read_table(
        Storage(), [str(Path(stage.stage_dir) / f["path"]) for f in stage.manifest["datasets"]["data"]["files"]]).to_pylist()}
    assert rows[(neox, "acc")]["value"] == out["results"]["lmpipe_plain_baseline"]["acc,none"]
    assert rows[(neox, "acc")]["step"] is None and rows[(run["hf"], "acc")]["n"] == 20
