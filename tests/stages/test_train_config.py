"""The train stage's config: composed of the components the training code takes, validated with
errors that name the YAML path, and importable without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, load_config
from stages.train.config import TrainConfig, TrainStageConfig
from tests.conftest import REPO


def test_importing_the_stage_does_not_import_torch():
    """`lmpipe stages` imports every stage; torch alone costs seconds, so the train stage defers it to run()."""
    code = ("import sys, stages.train; stages.train.TrainStage.Config.model_validate({}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_stage_hands_the_workers_its_own_config_with_the_documented_defaults():
    # The stage config *is* a TrainConfig (it subclasses it), so "the same defaults as the
    # trainer" holds by construction and a comparison of the two could not fail; what can fail
    # is the defaults themselves and the workers receiving the stage's config as it is.
    stage = TrainStageConfig()
    assert stage.loop.steps == 300 and stage.checkpoint.every == 100 and stage.cluster.num_workers == 2
    assert isinstance(stage, TrainConfig)
    assert TrainConfig.model_validate(stage.model_dump(include=set(TrainConfig.model_fields))) == TrainConfig(
        **{k: getattr(stage, k) for k in TrainConfig.model_fields})


def test_demo_training_settings():
    """The demo's hyper-parameters, as they were before the config was split into components."""
    raw = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())["stages"]["train"]["config"]
    cfg = TrainStageConfig.model_validate(raw)
    assert cfg.model.model_dump(exclude_none=True) == {"size": "debug", "dim": 128, "n_layers": 2, "n_heads": 4, "vocab_multiple_of": 64}
    assert cfg.optimizer.model_dump() == {"lr": 0.002, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0}
    assert cfg.schedule.model_dump() == {"warmup_steps": 20, "min_lr_ratio": 0.1}
    assert cfg.loop.model_dump() == {
        "steps": 300, "micro_batch_size": 4, "global_batch_tokens": None, "z_loss": 0.0, "spike_std": 6.0, "spike_window": 100,
        "spike_min_window": 20, "on_nonfinite": "stop", "max_nonfinite_skips": 10, "log_every": 10, "norms_every": 50, "eval_every": 50,
        "eval_max_sequences": 64, "peak_tflops": None, "deterministic": True, "loader_streams": 64, "shuffle_window": 1024}
    assert cfg.parallel.model_dump() == {"activation_checkpointing": False, "compile": False, "mixed_precision": "auto"}
    assert cfg.checkpoint.model_dump() == {"every": 100, "keep": None, "resume_from": None}
    assert cfg.cluster.model_dump() == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1.0},
                                        "threads_per_worker": None, "max_failures": 2}
    assert cfg.cluster.worker_threads() == 1
    assert cfg.in_loop_eval is not None and cfg.in_loop_eval.every == 100


def test_a_worker_count_that_divides_the_loader_streams_is_accepted():
    assert TrainStageConfig.model_validate({"cluster": {"num_workers": 3}, "loop": {"loader_streams": 48}}).cluster.num_workers == 3


@pytest.mark.parametrize("config, expected", [
    ({"loop": {"steps": 0}}, "stages.train.config.loop.steps: Input should be greater than or equal to 1"),
    ({"loop": {"steps": 5}, "schedule": {"warmup_steps": 5}}, "stages.train.config: Value error, schedule.warmup_steps (5) must be < loop.steps (5)"),
    ({"steps": 300}, "stages.train.config.steps: unknown key"),  # the flat layout before components
    ({"cluster": {"num_gpus": 1}}, "stages.train.config.cluster.num_gpus: unknown key"),
    ({"optimizer": {"lr": 0}}, "stages.train.config.optimizer.lr: Input should be greater than 0"),
    # refused when the pipeline is loaded, not inside AdamW after the upstream stages ran
    ({"optimizer": {"betas": [2, -1]}}, "stages.train.config.optimizer.betas[0]: Input should be less than 1"),
    ({"optimizer": {"betas": [0.9, -1]}}, "stages.train.config.optimizer.betas[1]: Input should be greater than or equal to 0"),
    ({"parallel": {"mixed_precision": "fp16"}}, "stages.train.config.parallel.mixed_precision: Input should be 'auto', 'bf16' or 'fp32'"),
    ({"in_loop_eval": {"validation": False, "task": None}}, "stages.train.config.in_loop_eval: Value error, in_loop_eval needs validation: true or a task"),
    # the loader's order is the same for any number of workers that divides its streams (64 by default)
    ({"cluster": {"num_workers": 3}}, "stages.train.config: Value error, cluster.num_workers (3) must divide loop.loader_streams (64)"),
])
def test_errors_name_the_yaml_path(pipeline_file, tmp_path, config, expected):
    path = pipeline_file(f"""
        name: t
        work_dir: {tmp_path}/work
        stages:
          train:
            uses: train
            config: {yaml.safe_dump(config, default_flow_style=True).strip()}
        """)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
