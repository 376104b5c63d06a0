"""lm-eval task files, lmpipe vs lm-evaluation-harness's Hugging Face backend, side by side in one
run, on the same checkpoint and the same YAML:

* ``arc``: an ARC-shaped multiple-choice task (choices of several tokens: MMLU's answers written
  out), ``acc`` / ``acc_norm``;
* ``gen``: a generative task (``generate_until``, greedy, ``until: ["\\n\\n", "Question:"]``,
  ``max_gen_toks`` 32), ``exact_match``.

    python bench/lmeval_tasks_bench.py                       # CPU, 400 multiple-choice + 100 generative documents
    python bench/lmeval_tasks_bench.py --device cuda --arc 2000 --gen 500

The checkpoint is bench/eval_bench.py's (the demo's shape, trained a few steps on the news
corpus): lmpipe reads the train-stage checkpoint, lm-eval its Hugging Face export. Both are timed
end to end (task file and data, prompts, tokenization, model load, forward passes / generation)
with the same torch threads, runs alternated, the best of each reported. The bench checks that
both give the same prediction per question and the same generation per document.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from eval_bench import build_checkpoint  # noqa: E402

ARC_YAML = """task: bench_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_YAML = """task: bench_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: 32
metric_list:
  - metric: exact_match
    ignore_case: true
"""


def write_tasks(work: Path, n_arc: int, n_gen: int) -> Path:
    from stages.evalsets import load_mmlu

    d = work / f"lmeval_tasks_{n_arc}_{n_gen}"
    d.mkdir(parents=True, exist_ok=True)
    examples = load_mmlu().examples
    arc = [{"question": e.context.strip(), "answerKey": "ABCD"[e.gold], "choices": {"text": list(e.choices), "label": list("ABCD")}}
           for e in examples[: 7 * n_arc : 7]]
    gen = [{"question": e.context.strip(), "answer": e.choices[e.gold]} for e in examples[3 : 3 + 11 * n_gen : 11]]
    (d / "arc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arc))
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (d / "bench_arc.yaml").write_text(ARC_YAML.format(path=d / "arc.jsonl"))
    (d / "bench_gen.yaml").write_text(GEN_YAML.format(path=d / "gen.jsonl"))
    return d


def run_lmpipe(info: dict, yaml_path: Path, device: str, threads: int, batch_tokens: int) -> dict:
    from pipeline.storage import Storage
    from stages.evaluate.lmeval_run import LmEvalJob
    from stages.evaluate.lmeval_tasks import build_doc_requests, load_docs, load_task_file
    from stages.evaluate.worker import EvalJob, run_job

    t0 = time.perf_counter()
    tf = load_task_file(str(yaml_path))
    requests, _ = build_doc_requests(tf, load_docs(tf, Storage()), 0)
    job = LmEvalJob(tf.name, tf.name, tf.output_type, tuple(requests), tf.metrics, tf.filters, tf.until, tf.max_gen_toks)
    res = run_job(EvalJob(checkpoint=info["checkpoint"], tokenizer_json=Path(info["tokenizer"]).read_text(), prefix_token=0, eos_token=1,
                          device=device, threads=threads, batch_tokens=batch_tokens, lmeval=(job,)))["lmeval"][tf.name]
    seconds = time.perf_counter() - t0
    answers = [s.get("pred", s.get("generation")) for s in res["samples"]]
    return {"examples": len(answers), "seconds": seconds, "examples_per_second": len(answers) / seconds,
            "metrics": {k: v["value"] for k, v in res["metrics"].items()}, "answers": answers}


def run_lm_eval(info: dict, task_dir: Path, task: str, device: str, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={info['hf']},dtype=float32", tasks=[task], num_fewshot=0,
                                  task_manager=TaskManager(include_path=str(task_dir)), batch_size=batch_size, device=device,
                                  log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    if task == "bench_arc":
        answers = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    else:
        answers = [s["resps"][0][0] for s in samples]
    return {"examples": len(samples), "seconds": seconds, "examples_per_second": len(samples) / seconds,
            "metrics": {k.split(",")[0]: v for k, v in out["results"][task].items() if "," in k and "stderr" not in k}, "answers": answers}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arc", type=int, default=400, help="multiple-choice documents")
    p.add_argument("--gen", type=int, default=100, help="generative documents")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lm-eval-batch-size", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--work", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache", "lmpipe", "eval_bench"))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lmeval_tasks.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work).resolve()
    info = build_checkpoint(work, args.train_steps)
    task_dir = write_tasks(work, args.arc, args.gen)
    load_before = os.getloadavg()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
              "device": args.device, "threads": args.threads, "model": "demo shape: d=128, 2 layers, 4 heads, vocab 16384, seq 1024",
              "tasks": {}}
    for task in ("bench_arc", "bench_gen"):
        ours_runs, theirs_runs = [], []
        for _ in range(args.repeats):  # alternating, so a burst of load from other jobs hits both
            ours_runs.append(run_lmpipe(info, task_dir / f"{task}.yaml", args.device, args.threads, args.batch_tokens))
            theirs_runs.append(run_lm_eval(info, task_dir, task, args.device, args.lm_eval_batch_size))
        ours = max(ours_runs, key=lambda r: r["examples_per_second"])
        theirs = max(theirs_runs, key=lambda r: r["examples_per_second"])
        same = sum(a == b for a, b in zip(ours["answers"], theirs["answers"]))
        result["tasks"][task] = {
            "lmpipe": {k: v for k, v in ours.items() if k != "answers"},
            "lm_eval": {k: v for k, v in theirs.items() if k != "answers"} | {"batch_size": args.lm_eval_batch_size},
            "speedup": ours["examples_per_second"] / theirs["examples_per_second"], "same_answer": same, "examples": len(ours["answers"]),
            "all_runs_examples_per_second": {"lmpipe": [r["examples_per_second"] for r in ours_runs],
                                             "lm_eval": [r["examples_per_second"] for r in theirs_runs]},
        }
        print(f"{task}: lmpipe {ours['examples_per_second']:.1f}/s, lm-eval {theirs['examples_per_second']:.1f}/s, "
              f"speedup {result['tasks'][task]['speedup']:.2f}x, same answer {same}/{len(ours['answers'])}, "
              f"metrics {ours['metrics']} vs {theirs['metrics']}")
    result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {load_before[0]:.1f} -> {result['load_average_after'][0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
