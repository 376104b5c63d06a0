"""``evaluate``: score a training run's checkpoints on multiple-choice tasks and on held-out text.

The stage class lives in :mod:`stages.evaluate.stage`; importing the package registers it."""

from stages.evaluate.stage import Evaluate, EvaluateConfig

__all__ = ["Evaluate", "EvaluateConfig"]
