"""Runs in its own process (Ray Train wants the dashboard on; the test session's Ray has it off):
the train stage through the Runner on 2 Ray workers with FSDP2/gloo, then the same training with
one worker killed mid-run. Writes what the tests check to a JSON file.

    python -m tests.stages.train_ray_job WORK_DIR OUT_JSON
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import ClassVar

from pipeline.config import load_config
from pipeline.registry import register
from pipeline.stage import DatasetStage, stage_seed
from stages.summaries.tokenize import TokenizeSummary
from tests.stages.train_support import SEQ_LEN, VOCAB, token_table

TRAIN_CONFIG = dict(
    model={"size": "debug", "dim": 32, "n_layers": 2, "n_heads": 2, "ffn_dim": 64},
    optimizer={"lr": 3e-3},
    schedule={"warmup_steps": 3},
    loop={"steps": 24, "micro_batch_size": 4, "log_every": 4, "eval_every": 12, "norms_every": 12},
    checkpoint={"every": 8},
    cluster={"num_workers": 2, "max_failures": 1, "threads_per_worker": 1},
)


@register
class TestTokenShards(DatasetStage):
    """Writes shards and a manifest section exactly as the tokenize stage does (without a corpus)."""

    name: ClassVar[str] = "test_token_shards"
    num_inputs = (0, 0)
    outputs = ("train", "validation")
    output_formats = {"train": "arrow", "validation": "arrow"}
    measure_column = None
    produces = ("tokens", "source", "doc_ids", "doc_offsets")
    Summary = TokenizeSummary

    def run(self, ctx) -> None:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        for split, rows, seed in (("train", 256, 0), ("validation", 32, 1)):
            out = ctx.part_outputs(split, formats=dict(self.output_formats), measure_column=None, max_rows_per_file=64)
            out.write(split, token_table(rows, seed=seed))
            ctx.add_part_result(out.close())
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        tok.train_from_iterator(["tiny corpus"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"]))
        rel = f"{ctx.attempt}/tokenizer.json"
        ctx.storage.write_bytes_atomic(os.path.join(ctx.stage_dir, rel), tok.to_str().encode())
        ctx.set_summary(TokenizeSummary(seq_len=SEQ_LEN, vocab_size=VOCAB, dtype="uint16", eos_id=2, bos_id=1, pad_id=0, tokenizer_path=rel))


def fault_delay_s() -> float:
    """The killed rank waits 1.5 polls of Ray Train's controller after its last report (3 s at the
    default 2 s; the test polls faster), so that the controller has collected that checkpoint."""
    return 1.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2"))


def train_pipeline(work: str, file: str, name: str, train_config: dict):
    """A pipeline of the test shards and the train stage with ``train_config``, in ``work``'s
    shared work dir (the shards are computed once, for every pipeline of the job)."""
    yaml_path = os.path.join(work, f"{file}.yaml")
    with open(yaml_path, "w") as f:
        f.write(textwrap.dedent(f"""
            name: {name}
            work_dir: {work}/work
            seed: 7
            stages:
              tokenize:
                uses: test_token_shards
              train:
                uses: train
                inputs: [tokenize.train]
                config: {json.dumps(train_config)}
            """))
    return load_config(yaml_path)


def main(work: str, out_json: str) -> None:
    import ray

    os.makedirs(work, exist_ok=True)
    # Ray's sockets live under its temp dir, and a Unix socket's path holds at most 107 bytes: the
    # test's own folder (under pytest-xdist's per-worker basetemp) is too deep for it
    ray_temp = tempfile.mkdtemp(prefix="lmpipe-ray-")
    try:
        run_jobs(work, out_json, ray_temp)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_temp, ignore_errors=True)


def run_jobs(work: str, out_json: str, ray_temp: str) -> None:
    import ray
    import torch

    from pipeline import local_ray
    from tests.conftest import free_port

    common = dict(num_cpus=3,  # 2 training workers + the checkpoint evaluation
                  log_to_driver=False, object_store_memory=256 * 1024 * 1024, _temp_dir=ray_temp)
    try:  # a free port: other Ray dashboards may run on this machine
        local_ray.start(include_dashboard=True, dashboard_port=free_port(), **common)
    except Exception as e:  # the dashboard is for speed and quiet logs, not correctness
        print(f"Ray with dashboard failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); without it", file=sys.stderr)
        ray.shutdown()
        local_ray.start(include_dashboard=False, **common)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # Train's helper actors join this cluster

    from mlflow import MlflowClient

    from pipeline.runner import Runner
    from stages.train import TrainStageConfig
    from stages.model import checkpoint as ckpt
    from stages.train.launch import FaultInjection, TrainSpec, launch_ray

    # in-loop evaluation on both FSDP ranks: a small multiple-choice task every 12 steps
    from tests.stages.test_evaluate_support import mmlu_like_records, write_task

    task_file = write_task(Path(work) / "qa.jsonl", mmlu_like_records(8))
    # and each checkpoint scored as it commits, by a Ray task beside the two training workers
    train_config = {**TRAIN_CONFIG, "in_loop_eval": {"every": 12, "validation": False, "task": "qa", "task_path": task_file},
                    "checkpoint_eval": {"tasks": [{"name": "qa", "path": task_file}], "validation": False}}
    loaded = train_pipeline(work, "pipeline", "train-test", train_config)
    report = Runner(loaded).run()
    stage = report.stage("train")
    manifest = stage.manifest
    client = MlflowClient(loaded.resolved.tracking_uri())
    run = client.get_run(stage.run_id)
    result = {
        "manifest_train": manifest["summary"]["data"],
        "rows": manifest["datasets"]["data"]["rows"],
        "metric_keys": sorted(run.data.metrics),
        "loss_history": [m.value for m in sorted(client.get_metric_history(stage.run_id, "loss"), key=lambda m: m.step)],
        "in_loop_acc_steps": sorted(m.step for m in client.get_metric_history(stage.run_id, "eval/qa_0shot/acc")),
        "checkpoint_eval_steps": {key: sorted(m.step for m in client.get_metric_history(stage.run_id, key))
                                  for key in ("checkpoint_eval/qa_0shot/acc", "checkpoint_eval/qa_0shot/acc_norm")},
        "artifacts": sorted(a.path for a in client.list_artifacts(stage.run_id)),
        "outputs": [o.model_id for o in (run.outputs.model_outputs if run.outputs else [])],
    }
    if manifest["summary"]["data"]["mlflow_model_id"]:
        model = client.get_logged_model(manifest["summary"]["data"]["mlflow_model_id"])
        result["logged_model"] = {"status": str(model.status), "tags": model.tags, "source_run_id": model.source_run_id, "name": model.name}

    # The same training, with rank 1 killed after step 12: Ray restarts the group from step 8.
    shards = report.stage("tokenize")
    cfg = TrainStageConfig(**TRAIN_CONFIG)
    spec = TrainSpec(
        train=cfg, model=cfg.model.build(VOCAB, SEQ_LEN), seq_len=SEQ_LEN, seed=stage_seed(7, "train"),
        train_files=[os.path.join(shards.stage_dir, f["path"]) for f in shards.manifest["datasets"]["train"]["files"]],
        val_files=[os.path.join(shards.stage_dir, f["path"]) for f in shards.manifest["datasets"]["validation"]["files"]],
        threads_per_worker=cfg.cluster.worker_threads(), fault=FaultInjection(step=12, marker=os.path.join(work, "killed"), delay_s=fault_delay_s()),
    )
    # its checkpoints go to S3 (moto's server) when the test gives one: a restart resumes from S3
    endpoint = os.environ.get("LMPIPE_TEST_S3_ENDPOINT")
    from pipeline.storage import Storage

    storage = Storage({"s3": {"endpoint_url": endpoint}}) if endpoint else None
    killed_path = "s3://trainckpt/killed-run" if endpoint else os.path.join(work, "killed-run")
    killed = launch_ray(spec, cfg.cluster, storage_path=killed_path, name="run", storage=storage)
    a = ckpt.load_full_model(manifest["summary"]["data"]["final_checkpoint"]).state_dict()
    with killed.checkpoint.as_directory() as d:
        b = ckpt.load_full_model(d).state_dict()
        killed_extra = ckpt.load_extra(d, 0)
    result["killed"] = {
        "marker": os.path.exists(os.path.join(work, "killed")),
        "checkpoint_path": killed.checkpoint.path,
        "checkpoint_filesystem": type(killed.checkpoint.filesystem).__name__,
        "step": killed_extra["step"],
        "same_weights": all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys(),
        "history_equal": json.loads(killed_extra["trainer"])["history"] == json.loads(ckpt.load_extra(manifest["summary"]["data"]["final_checkpoint"], 0)["trainer"])["history"],
    }
    rerun = Runner(loaded).run()
    result["rerun_cached"] = rerun.stage("train").cached
    result["resumed"] = resume_and_force(work, manifest["summary"]["data"]["final_checkpoint"])
    result["lease_lost"] = lease_lost_mid_training(work)
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1, default=str)
    ray.shutdown()


def resume_and_force(work: str, checkpoint: str) -> dict:
    """Another pipeline continues the 2-worker run's final checkpoint (step 24) on 1 worker to step
    26 (``checkpoint.resume_from``); then ``--stage train --force`` reruns it, which must train
    steps 25-26 again in a new Ray Train run (Ray Train resumed the committed run, at step 26)."""
    from mlflow import MlflowClient

    from pipeline.runner import Runner
    from stages.model import checkpoint as ckpt

    train_config = {**TRAIN_CONFIG, "loop": {**TRAIN_CONFIG["loop"], "steps": 26, "log_every": 1, "eval_every": 0, "norms_every": 0},
                    "checkpoint": {"every": 8, "resume_from": checkpoint}, "cluster": {**TRAIN_CONFIG["cluster"], "num_workers": 1}}
    loaded = train_pipeline(work, "resume", "train-resume-test", train_config)
    client = MlflowClient(loaded.resolved.tracking_uri())
    import torch

    out, weights = {}, {}
    for label, run in (("first", lambda: Runner(loaded).run()), ("forced", lambda: Runner(loaded).run(only="train", force=True))):
        stage = run().stage("train")
        summary = stage.manifest["summary"]["data"]
        # read now: the forced rerun's commit removes the Ray Train run it replaces (superseded_folders)
        weights[label] = ckpt.load_full_model(summary["final_checkpoint"]).state_dict()
        model_id = summary["mlflow_model_id"]
        out[label] = {
            "cached": stage.cached,
            "summary": summary,
            "external_inputs": [e["name"] for e in stage.manifest.get("external_inputs", [])],
            "loss_steps": sorted(m.step for m in client.get_metric_history(stage.run_id, "loss")),
            "model_tags": client.get_logged_model(model_id).tags if model_id else {},
            "history_steps": [h["step"] for h in json.loads(ckpt.load_extra(summary["final_checkpoint"], 0)["trainer"])["history"]],
        }
    a, b = weights["first"], weights["forced"]
    out["forced_same_weights"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return out


def lease_lost_mid_training(work: str) -> dict:
    """A long training whose stage lease is taken over mid-run (as a second run does when the
    first was paused past its lease): the Ray Train run stops at its next logged step, and the
    stage commits nothing."""
    import glob
    import threading
    import time
    import uuid

    from pipeline.locks import LOCK_FILE
    from pipeline.runner import Runner

    steps = 4000  # minutes of training, were it not stopped
    train_config = {**TRAIN_CONFIG, "loop": {**TRAIN_CONFIG["loop"], "steps": steps, "log_every": 5, "eval_every": 0, "norms_every": 0},
                    "checkpoint": {"every": 10000}, "cluster": {**TRAIN_CONFIG["cluster"], "num_workers": 1}}
    os.environ["LMPIPE_LEASE_TTL_S"] = "4"  # the holder renews every second: it learns of the take-over at once
    loaded = train_pipeline(work, "lease", "train-lease-test", train_config)
    taken: dict = {}

    def take_over() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            runs = [d for d in glob.glob(f"{work}/work/train/*/ray-train-*")
                    if not os.path.exists(os.path.join(os.path.dirname(d), "_manifest.json"))]
            if runs:  # the Ray Train run is being started: its workers learn of the take-over when they train
                lock = os.path.join(os.path.dirname(runs[0]), LOCK_FILE)
                with open(lock, "w") as f:  # another run's lease now (a plain overwrite: the holder's next beat fails)
                    json.dump({"token": uuid.uuid4().hex, "pid": 1, "host": "elsewhere", "beat": 0}, f)
                taken["at"] = time.monotonic()
                taken["stage_dir"] = os.path.dirname(runs[0])
                return
            time.sleep(0.5)

    Runner(loaded).run(only="tokenize")  # committed already by the first pipeline: cached
    thread = threading.Thread(target=take_over, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        Runner(loaded).run(only="train", force=True)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        os.environ.pop("LMPIPE_LEASE_TTL_S", None)
    ended = time.monotonic()
    thread.join(5)
    from mlflow import MlflowClient

    client = MlflowClient(loaded.resolved.tracking_uri())
    experiment = client.get_experiment_by_name(loaded.resolved.mlflow.experiment)
    [run] = client.search_runs([experiment.experiment_id], "tags.`lmpipe.stage` = 'train'", order_by=["attributes.start_time DESC"],
                               max_results=1)  # this pipeline's train run: the latest
    return {
        "logged_steps": sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")),
        "error": error,
        "taken": "at" in taken,
        "stopped_s_after_take_over": ended - taken["at"] if "at" in taken else None,
        "ran_s": ended - started,
        "committed": bool(taken) and os.path.exists(os.path.join(taken["stage_dir"], "_manifest.json")),
    }


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
