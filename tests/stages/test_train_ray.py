"""The train stage on 2 Ray Train workers (FSDP2 over gloo) through the Runner, and a run whose
worker is killed mid-training. Runs in a subprocess with its own Ray (dashboard on, as Train V2
wants) so the session's dashboard-less Ray is untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import RAY_TRAIN_QUICK_POLL, REPO

# five Ray Train runs in one job: ~200 s alone, up to ~530 s beside other tests on two busy vCPUs
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def job(tmp_path_factory, s3_server):
    from tests.conftest import make_bucket

    work = tmp_path_factory.mktemp("train-ray")
    out = work / "result.json"
    make_bucket(s3_server, "trainckpt")
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "LMPIPE_PROGRESS": "0", "LMPIPE_TEST_S3_ENDPOINT": s3_server["endpoint_url"],
           "AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"], "AWS_DEFAULT_REGION": s3_server["region"],
           **RAY_TRAIN_QUICK_POLL}
    proc = subprocess.run([sys.executable, "-m", "tests.stages.train_ray_job", str(work), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1080)
    if proc.returncode != 0:
        pytest.fail(f"train job failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


def test_two_worker_fsdp_training_lowers_the_loss(job):
    losses = job["loss_history"]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.3, losses
    train = job["manifest_train"]
    assert train["steps"] == 24 and train["world_size"] == 2 and train["tokens_seen"] == 24 * 2 * 4 * 32


def test_checkpoints_table_and_export_are_recorded(job):
    train = job["manifest_train"]
    assert job["rows"] == 3  # steps 8, 16, 24
    assert os.path.isfile(os.path.join(train["hf_export"], "model.safetensors"))
    assert os.path.isfile(os.path.join(train["hf_export"], "tokenizer.json"))
    assert os.path.isdir(train["final_checkpoint"])
    assert job["rerun_cached"]


def test_mlflow_gets_training_metrics_curve_and_model(job):
    keys = set(job["metric_keys"])
    assert {"loss", "lr", "grad_norm", "clip_events", "skipped_steps", "tokens_seen", "tokens_per_second",
            "tokens_per_second_per_device", "step_time", "data_wait", "peak_memory_bytes", "param_norm",
            "optim_exp_avg_norm", "activation_rms/layer_00", "val_loss/news", "val_loss/code"} <= keys
    assert "mfu" not in keys  # CPU: n/a
    # in-loop evaluation ran on both FSDP ranks (a sharded forward is collective) and rank 0 logged it
    assert {"eval/qa_0shot/acc", "eval/qa_0shot/acc_norm", "eval/seconds"} <= keys
    assert job["in_loop_acc_steps"] == [12, 24]
    assert "loss_curve.png" in job["artifacts"]
    model = job["logged_model"]
    assert model["status"].endswith("READY") and job["outputs"] == [job["manifest_train"]["mlflow_model_id"]]
    assert model["tags"]["lmpipe.train_dataset"] == "tokenize.train"
    assert model["name"] == "train-test-train-step24"  # the pipeline, the model, the step: as evaluate names checkpoints


def test_each_checkpoint_is_scored_as_it_commits_by_a_separate_ray_task(job):
    """checkpoint_eval: Ray Train's checkpoint validation ran the evaluation of every committed
    checkpoint in a task of its own; the results lie beside the checkpoints, keyed by fingerprint,
    and the metrics are in the train run at each checkpoint's step."""
    train = job["manifest_train"]
    evaluations = train["checkpoint_evaluations"]
    assert [(e["step"], e["status"]) for e in evaluations] == [(8, "scored"), (16, "scored"), (24, "scored")], evaluations
    for e in evaluations:
        assert len(e["results"]) == 1  # the qa task group
        for uri in e["results"]:
            assert os.path.isfile(uri) and uri.startswith(os.path.join(os.path.dirname(e["path"]), "evaluations", os.path.basename(e["path"])))
    assert job["checkpoint_eval_steps"] == {"checkpoint_eval/qa_0shot/acc": [8, 16, 24], "checkpoint_eval/qa_0shot/acc_norm": [8, 16, 24]}


def test_killed_worker_resumes_to_identical_weights(job):
    killed = job["killed"]
    assert killed["marker"], "the fault was never injected"
    assert killed["step"] == 24
    assert killed["same_weights"] and killed["history_equal"]
    # the restarted group resumed from checkpoints on S3 (moto's server), not from local disk
    assert killed["checkpoint_path"].startswith("trainckpt/killed-run/"), killed
    assert killed["checkpoint_filesystem"] == "PyFileSystem", killed  # pyarrow over s3fs


def test_resume_from_continues_another_runs_checkpoint_on_another_worker_count(job):
    first = job["resumed"]["first"]
    summary = first["summary"]
    assert not first["cached"] and summary["steps"] == 26 and summary["world_size"] == 1
    # the lineage: the 2-worker run's final checkpoint, in the summary, the manifest and MLflow
    source = job["manifest_train"]["final_checkpoint"]
    assert summary["resumed_from"] == {"checkpoint": source, "step": 24, "tokens_seen": 24 * 2 * 4 * 32, "world_size": 2}
    assert "resume_from" in first["external_inputs"]
    assert first["model_tags"]["lmpipe.resumed_from"] == source and first["model_tags"]["lmpipe.resumed_from_step"] == "24"
    assert first["loss_steps"] == [25, 26]  # trained only the steps after the checkpoint
    assert first["history_steps"][-1] == 26 and 24 in first["history_steps"]  # the source run's history continues


def test_force_trains_afresh_in_a_new_ray_train_run(job):
    first, forced = job["resumed"]["first"], job["resumed"]["forced"]
    assert not forced["cached"]
    # before: Ray Train resumed the committed run (same name, same storage) at step 26 and trained nothing
    assert forced["loss_steps"] == [25, 26]
    assert forced["summary"]["ray_train_run"] != first["summary"]["ray_train_run"]
    assert forced["summary"]["steps"] == 26 and job["resumed"]["forced_same_weights"]


def test_a_training_whose_lease_is_taken_over_stops_and_commits_nothing(job):
    """Two runs must not both train for hours when only one can commit: once the stage's lease is
    lost, the Ray Train run stops at its next logged step (4,000 steps were asked for)."""
    lost = job["lease_lost"]
    assert lost["taken"], lost
    assert lost["error"] and "LeaseLost" in lost["error"], lost
    assert lost["logged_steps"] and max(lost["logged_steps"]) <= 10, lost  # stopped at step 5 (or 10, were it slow to see)
    assert not lost["committed"], lost
