"""``train``: pretrain a LLaMA-style model on the tokenize stage's shards with Ray Train + FSDP2.

The stage class lives in :mod:`stages.train.stage`, its configuration in :mod:`stages.train.config`;
importing the package registers the stage without importing torch (the training code is imported
when the stage runs)."""

from stages.train.config import (
    CheckpointConfig,
    ClusterConfig,
    InLoopEvalConfig,
    LoopConfig,
    ModelSpec,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    TrainStageConfig,
)
from stages.train.stage import TrainStage

__all__ = ["CheckpointConfig", "ClusterConfig", "InLoopEvalConfig", "LoopConfig", "ModelSpec", "OptimizerConfig", "ParallelConfig",
           "ScheduleConfig", "TrainConfig", "TrainStage", "TrainStageConfig"]
